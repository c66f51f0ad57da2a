#!/usr/bin/env bash
# Fail, naming the fix, unless the Horovod on PATH was built with PyTorch, MPI and Gloo.
# (A Horovod whose torch extension failed to build only warns at `import horovod.torch`, and one
# built without MPI runs every rank as a world of 1 under mpirun or srun.)
set -euo pipefail
check=$(horovodrun --check-build 2>&1) || { echo "[setup] error: 'horovodrun --check-build' failed: $check" >&2; exit 1; }
missing=()
for feature in PyTorch MPI Gloo; do
  grep -q "\[X\] $feature" <<<"$check" || missing+=("$feature")
done
if (( ${#missing[@]} )); then
  echo "[setup] error: Horovod was built without ${missing[*]}: delete the cached wheel (${MEGDET_WHEEL_CACHE:-~/.cache/megdet/wheels}) and rerun 'MEGDET_FORCE_SETUP=1 bash scripts/setup.sh'" >&2
  exit 1
fi
echo "[setup] Horovod has PyTorch, MPI and Gloo"
