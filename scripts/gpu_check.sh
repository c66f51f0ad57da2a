#!/usr/bin/env bash
# Prove a GPU node in one command: set up (offline), then `megdet bench node`, which prints a table
# and writes node.json (doctor, the R50-FPN step beside torchvision, fp32/bf16/fp16, cross-GPU BN
# exact on CUDA, a 30-iteration train + evaluation). About 4 minutes on one H200, 8 at most.
#
#   bash scripts/gpu_check.sh --fetch DIR     # on a machine that reaches PyPI: fill DIR for the node
#   MEGDET_OFFLINE_DIR=DIR bash scripts/gpu_check.sh [--out OUT] [--horovod]
#                                             # on the GPU node (torch, CUDA and nvcc there, no internet)
#   bash scripts/gpu_check.sh --cpu [--out OUT]   # the same steps at tiny sizes on the CPU (make test)
#
# On the node the torch already installed is used (MEGDET_TORCH=system); what it lacks (pycocotools,
# tqdm, PyYAML, matplotlib, Horovod's sdist...) comes from MEGDET_OFFLINE_DIR. --horovod also builds
# Horovod with NCCL (minutes: not part of the 8) and runs `megdet doctor` under it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOROVOD_VERSION=0.28.1
# What a node with torch, torchvision, numpy, Pillow and h5py may lack (set-up's Python dependencies and
# theirs, named one by one: resolving them would also fetch numpy and Pillow, and the folder travels to
# the node within 64 MiB), for Python $FETCH_PYTHON on x86_64 Linux.
FETCH_PYTHON=${FETCH_PYTHON:-3.12}
PACKAGES=(pycocotools tqdm PyYAML matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
          tensorboard tensorboard-data-server absl-py grpcio markdown protobuf werkzeug markupsafe
          pytest iniconfig pluggy pygments cloudpickle psutil packaging "setuptools>=64" wheel)

die() { echo "[gpu_check] error: $*" >&2; exit 1; }

mode=gpu out=$ROOT/runs/bench/node horovod=0
while (( $# )); do
  case $1 in
    --fetch) [[ $# -ge 2 ]] || die "--fetch needs a folder: --fetch DIR"; mode=fetch fetch_dir=$2; shift 2 ;;
    --cpu) mode=cpu; shift ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder: --out DIR"; out=$2; shift 2 ;;
    --horovod) horovod=1; shift ;;
    *) die "unknown argument $1: use --fetch DIR, --cpu, --out DIR or --horovod" ;;
  esac
done

if [[ $mode == fetch ]]; then
  mkdir -p "$fetch_dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$FETCH_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$fetch_dir" "${PACKAGES[@]}"
  python3 -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$fetch_dir"
  echo "[gpu_check] $(ls "$fetch_dir" | wc -l) files, $(du -sh "$fetch_dir" | cut -f1) in $fetch_dir: carry it to the node and set MEGDET_OFFLINE_DIR=$fetch_dir"
  exit 0
fi

cd "$ROOT"
if [[ $mode == cpu ]]; then
  bash scripts/setup.sh
else
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "python3's torch sees no GPU: run this on a GPU node (or pass --cpu)"
  [[ -n ${MEGDET_OFFLINE_DIR:-} ]] || echo "[gpu_check] no MEGDET_OFFLINE_DIR: set-up installs from the package index"
  if (( horovod )); then
    MEGDET_TORCH=system bash scripts/setup.sh
  else
    MEGDET_TORCH=system MEGDET_SKIP_HOROVOD=1 bash scripts/setup.sh
  fi
fi
export PATH=$ROOT/.venv/bin:$PATH
started=$(date +%s)
status=0
if [[ $mode == cpu ]]; then
  megdet bench node --cpu --out "$out" || status=$?
else
  megdet bench node --out "$out" || status=$?
  if (( horovod )); then
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
    horovodrun -np "$gpus" -H "localhost:$gpus" megdet doctor --device cuda || status=$?
  fi
fi
echo "[gpu_check] $mode check finished in $(( $(date +%s) - started )) s with status $status; results in $out/node.json"
exit "$status"
