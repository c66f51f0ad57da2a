#!/usr/bin/env bash
# Prove a GPU node in one command: set up (offline), then `megdet bench node`, which prints a table
# and writes node.json (doctor, the R50-FPN step beside torchvision, fp32/bf16/fp16, cross-GPU BN
# exact on CUDA, a 30-iteration train + evaluation). About 4 minutes on one H200, 8 at most.
#
#   bash scripts/gpu_check.sh --fetch DIR [--horovod] [PACKAGE...]
#       on a machine that reaches PyPI: fill DIR with what the node lacks, for Python $FETCH_PYTHON
#       (pycocotools; with --horovod Horovod's sdist and its build's cffi and pycparser; and each
#       PACKAGE named, e.g. one set-up said DIR lacks, or mpich for a Horovod with MPI)
#   MEGDET_OFFLINE_DIR=DIR bash scripts/gpu_check.sh [--out OUT] [--horovod]
#       on the GPU node (torch, CUDA and nvcc there, no internet): the node's set-up, the checks at full
#       size; --horovod also builds Horovod with NCCL (minutes: not part of the 8) and runs
#       `megdet doctor` under horovodrun
#   bash scripts/gpu_check.sh --cpu [--out OUT] [--horovod]
#       the same checks at CPU sizes, without a GPU: after make test's set-up, or after the node's when
#       MEGDET_TORCH=system is set (scripts/node_twin.sh runs it so, offline)
#
# The node's set-up (MEGDET_TORCH=system) keeps the torch python3 has and installs into .venv only what
# python3 lacks, from MEGDET_OFFLINE_DIR; Horovod only with --horovod.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOROVOD_VERSION=0.28.1
FETCH_PYTHON=${FETCH_PYTHON:-3.12}
# What the lent H200 node lacks of set-up's Python dependencies (its package list:
# .library/device/KINDS.md); everything else set-up needs is there.
NODE_LACKS=(pycocotools)
HOROVOD_BUILD_NEEDS=(cffi pycparser)   # cffi is in Horovod's setup_requires, pycparser is cffi's

die() { echo "[gpu_check] error: $*" >&2; exit 1; }

mode=gpu out=$ROOT/runs/bench/node horovod=0 extra=()
while (( $# )); do
  case $1 in
    --fetch) [[ $# -ge 2 && $2 != -* ]] || die "--fetch needs a folder: --fetch DIR"; mode=fetch fetch_dir=$2; shift 2 ;;
    --cpu) mode=cpu; shift ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder: --out DIR"; out=$2; shift 2 ;;
    --horovod) horovod=1; shift ;;
    -*) die "unknown argument $1: use --fetch DIR, --cpu, --out DIR or --horovod" ;;
    *) [[ $mode == fetch ]] || die "unknown argument $1: package names follow --fetch DIR"; extra+=("$1"); shift ;;
  esac
done

if [[ $mode == fetch ]]; then
  mkdir -p "$fetch_dir"
  wheels=("${NODE_LACKS[@]}")
  (( ! horovod )) || wheels+=("${HOROVOD_BUILD_NEEDS[@]}")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$FETCH_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$fetch_dir" "${wheels[@]}" ${extra[@]+"${extra[@]}"}
  (( ! horovod )) || python3 -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$fetch_dir"
  echo "[gpu_check] $(ls "$fetch_dir" | wc -l) files, $(du -sh "$fetch_dir" | cut -f1) in $fetch_dir: carry it to the node and set MEGDET_OFFLINE_DIR=$fetch_dir"
  exit 0
fi

out=$(realpath -m "$out")
[[ -z ${MEGDET_OFFLINE_DIR:-} ]] || export MEGDET_OFFLINE_DIR=$(realpath -m "$MEGDET_OFFLINE_DIR")
cd "$ROOT"
if [[ $mode == gpu ]]; then
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "python3's torch sees no GPU: run this on a GPU node (or pass --cpu)"
  export MEGDET_TORCH=system
  [[ -n ${MEGDET_OFFLINE_DIR:-} ]] || echo "[gpu_check] no MEGDET_OFFLINE_DIR: set-up installs from the package index"
fi
setup_started=$(date +%s)
if [[ ${MEGDET_TORCH:-} == system ]] && (( ! horovod )); then
  MEGDET_SKIP_HOROVOD=1 bash scripts/setup.sh
else
  bash scripts/setup.sh
fi
export PATH=$ROOT/.venv/bin:$PATH
started=$(date +%s)
echo "[gpu_check] set-up took $(( started - setup_started )) s"
status=0
if [[ $mode == cpu ]]; then
  megdet bench node --cpu --out "$out" || status=$?
  ranks=2 device=cpu
else
  megdet bench node --out "$out" || status=$?
  ranks=$(python -c 'import torch; print(torch.cuda.device_count())') device=cuda
fi
if (( horovod )); then
  horovodrun -np "$ranks" -H "localhost:$ranks" megdet doctor --device "$device" || status=$?
fi
echo "[gpu_check] $mode check finished in $(( $(date +%s) - started )) s with status $status; results in $out/node.json"
exit "$status"
