#!/usr/bin/env bash
# Fail, naming the fix, unless the Horovod on PATH was built with PyTorch, Gloo and MPI, and with NCCL
# when torch has CUDA. (A Horovod whose torch extension failed to build only warns at
# `import horovod.torch`; one built without MPI runs every rank as a world of 1 under mpirun or srun;
# one built without NCCL copies every GPU tensor through the host.)
#
#   bash scripts/check_horovod_build.sh                 # MPI required
#   bash scripts/check_horovod_build.sh --without-mpi   # set-up built it without MPI, on purpose
set -euo pipefail
required=(PyTorch MPI Gloo) without=
case ${1:-} in
  "") ;;
  --without-mpi) required=(PyTorch Gloo) without=" (built without MPI: launch with horovodrun or torchrun)" ;;
  *) echo "[setup] error: unknown argument $1: use --without-mpi or nothing" >&2; exit 1 ;;
esac
check=$(horovodrun --check-build 2>&1) || { echo "[setup] error: 'horovodrun --check-build' failed: $check" >&2; exit 1; }
if [[ $(python -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true) ]]; then
  required+=(NCCL)
fi
missing=()
for feature in "${required[@]}"; do
  grep -q "\[X\] $feature" <<<"$check" || missing+=("$feature")
done
if (( ${#missing[@]} )); then
  echo "[setup] error: Horovod was built without ${missing[*]}: delete the cached wheel (${MEGDET_WHEEL_CACHE:-~/.cache/megdet/wheels}) and rerun 'MEGDET_FORCE_SETUP=1 bash scripts/setup.sh'" >&2
  exit 1
fi
echo "[setup] Horovod has $(IFS=,; echo "${required[*]}" | sed 's/,\([^,]*\)$/ and \1/; s/,/, /g')$without"
