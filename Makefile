# Two commands do everything on a fresh machine (Python 3.11, root or the build tools present):
#   make demo   set up .venv (torch, MPI, Horovod built once and cached), then the demo run
#   make test   the same set-up, then the whole test suite, multi-rank tests included
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
NP ?= 2

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	horovodrun --gloo -np $(NP) -H localhost:$(NP) megdet doctor
	mpirun -np $(NP) megdet doctor

test: setup
	python -m pytest -ra $(PYTEST_ARGS)
