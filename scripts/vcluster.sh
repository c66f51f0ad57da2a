#!/bin/bash
# A multi-node Slurm cluster on this machine, each node a network namespace (tests/vcluster.py):
#   scripts/vcluster.sh up [--nodes 3] [--cpus 4] | down | status | exec NODE COMMAND...
# As root. Then: export SLURM_CONF=/tmp/megdet-vcluster-0/slurm.conf and use sbatch, srun, sinfo.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=$REPO/.venv/bin/python
[[ -x $PYTHON ]] || PYTHON=python3
cd "$REPO"
exec "$PYTHON" -m tests.vcluster "$@"
