# Two commands do everything on a fresh machine (Python 3.11, root or the build tools present):
#   make demo   set up .venv (torch, MPI, Horovod built once and cached), then the demo run:
#               synthetic shapes -> HDF5 shards -> 2 ranks under horovodrun (gradients averaged by
#               Horovod, cross-GPU BN's small blocking allreduces on torch.distributed, as the job
#               scripts run them; PMD-LAMB) -> evaluated every 50 iterations, scored beside training,
#               until box AP50 >= 85 -> the iteration and time it was reached, the AP table, the plot
#               (make demo SEED=1 DEMO_RUN=runs/demo-seed1: another seed in its own folder;
#               DEMO_OVERRIDES="key=value ...": more settings for its run)
#   make demo-mask  the same with Mask R-CNN's mask branch (shapes_mask_r18_cpu): box and mask AP
#   make test   the same set-up, then the whole test suite, multi-rank tests included
#   make test-fast  the inner loop: the suite without slow tests and without those that launch ranks
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
NP ?= 2
DEMO_DATA := data/shapes128
DEMO_RUN ?= runs/demo
SEED ?= 0
# more settings for the demo's run, e.g. DEMO_OVERRIDES="train.async_eval=false train.amp=none"
DEMO_OVERRIDES ?=
# Horovod's background thread wakes every cycle; with 2 ranks on 2 busy cores its default 1 ms cycle takes
# CPU from the compute threads: 11.2 images/s against 13.3 at 10 ms (docs/benchmarks.md)
DEMO_HOROVOD_CYCLE := --cycle-time-ms 10
MASK_DEMO_DATA := data/shapes128-masks
MASK_DEMO_RUN := runs/demo-mask

.PHONY: setup demo demo-mask test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	test -f $(DEMO_DATA)/annotations/instances_val.json || megdet synth --out $(DEMO_DATA) --train 1600 --val 100 --size 128
	megdet pack --coco-json $(DEMO_DATA)/annotations/instances_train.json --images $(DEMO_DATA)/train --out $(DEMO_DATA)/shards/train
	megdet pack --coco-json $(DEMO_DATA)/annotations/instances_val.json --images $(DEMO_DATA)/val --out $(DEMO_DATA)/shards/val
	MEGDET_COMM=horovod MEGDET_CGBN_COMM=torch horovodrun --gloo -np $(NP) -H localhost:$(NP) $(DEMO_HOROVOD_CYCLE) megdet train shapes_r18_cpu_to_target train.seed=$(SEED) train.output_dir=$(DEMO_RUN) $(DEMO_OVERRIDES) --resume

# The same images as the demo's, in a folder of their own: data from before megdet synth wrote masks has none.
demo-mask: setup
	test -f $(MASK_DEMO_DATA)/annotations/instances_val.json || megdet synth --out $(MASK_DEMO_DATA) --train 1600 --val 100 --size 128
	megdet pack --coco-json $(MASK_DEMO_DATA)/annotations/instances_train.json --images $(MASK_DEMO_DATA)/train --out $(MASK_DEMO_DATA)/shards/train
	megdet pack --coco-json $(MASK_DEMO_DATA)/annotations/instances_val.json --images $(MASK_DEMO_DATA)/val --out $(MASK_DEMO_DATA)/shards/val
	MEGDET_COMM=torch horovodrun --gloo -np $(NP) -H localhost:$(NP) megdet train shapes_mask_r18_cpu train.output_dir=$(MASK_DEMO_RUN) --resume

test: setup
	python -m pytest -ra $(PYTEST_ARGS)

test-fast: setup
	python -m pytest -ra -m "not slow and not multirank" $(PYTEST_ARGS)
