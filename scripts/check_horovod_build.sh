#!/usr/bin/env bash
# Fail, naming the fix, unless the Horovod on PATH was built with PyTorch, MPI and Gloo, and with NCCL
# when torch has CUDA. (A Horovod whose torch extension failed to build only warns at
# `import horovod.torch`; one built without MPI runs every rank as a world of 1 under mpirun or srun;
# one built without NCCL copies every GPU tensor through the host.)
set -euo pipefail
check=$(horovodrun --check-build 2>&1) || { echo "[setup] error: 'horovodrun --check-build' failed: $check" >&2; exit 1; }
required=(PyTorch MPI Gloo)
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
echo "[setup] Horovod has $(IFS=,; echo "${required[*]}" | sed 's/,\([^,]*\)$/ and \1/; s/,/, /g')"
