#!/usr/bin/env bash
# A twin of the lent GPU node on a CPU machine, to prove the node's set-up before a node is at hand.
# It builds the node's Python (a Python 3.12 venv holding PyPI's torch==2.11.0, which is the node's cu130
# build, torchvision==0.26.0 and what else the node has; no pycocotools, Horovod or MPI), fills an
# offline folder with `gpu_check.sh --fetch`, copies the project as it would travel, then, with the
# network cut (unshare --net), runs what scripts/gpu_check.sh runs on the node: the node's set-up from
# the offline folder with that Python as python3 (MEGDET_TORCH=system), then `megdet bench node --cpu`
# (no GPU here: the checks at CPU sizes). It fails when what travels (project + offline folder) is
# 20 MB or more.
#
#   bash scripts/node_twin.sh             # a few minutes; the first run downloads the venv (about 5 GB)
#   bash scripts/node_twin.sh --horovod   # also builds Horovod with NCCL offline, against the
#                                         # nvidia-nccl-cu13 wheel with this machine's nvcc (no GPU
#                                         # needed; about 7 minutes on 2 cores), and runs doctor under it
#
# Needs root (for unshare --net), a Python 3.12 (pyenv's, or TWIN_PYTHON) and, with --horovod, nvcc.
# The node's Python stays in ${MEGDET_TWIN_DIR:-~/.cache/megdet/node-twin}/python; each run starts a
# fresh work/ beside it (the project's copy and its .venv, the offline folder, the results in out/).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TWIN=${MEGDET_TWIN_DIR:-$HOME/.cache/megdet/node-twin}
PARENT=$TWIN/python
WORK=$TWIN/work
# The node's Python packages that set-up and the checks touch (.library/device/KINDS.md lists them all).
NODE_PACKAGES=(torch==2.11.0 torchvision==0.26.0 numpy Pillow h5py mpi4py matplotlib tqdm PyYAML tensorboard
               pytest psutil cloudpickle packaging cmake ninja)
NODE_MODULES=(torch torchvision numpy PIL h5py mpi4py matplotlib tqdm yaml tensorboard pytest psutil cloudpickle
              packaging cmake ninja)
TRAVEL_LIMIT_MB=20

say() { echo "[node_twin] $*"; }
die() { echo "[node_twin] error: $*" >&2; exit 1; }
since() { echo "$(( $(date +%s) - $1 )) s"; }

horovod=0
for argument in "$@"; do
  case $argument in
    --horovod) horovod=1 ;;
    *) die "unknown argument $argument: use --horovod or nothing" ;;
  esac
done
[[ $(id -u) == 0 ]] && unshare --net true 2>/dev/null \
  || die "the twin cuts the network with 'unshare --net', which needs root here: run it as root"
command -v ip >/dev/null || die "the twin brings up loopback with 'ip' (iproute2): install it (apt-get install iproute2)"
git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 \
  || die "the twin copies the project's files as git lists them: run it from a clone ($ROOT is not one)"
if (( horovod )); then
  command -v nvcc >/dev/null || die "--horovod builds Horovod's NCCL operations with nvcc, which is not on PATH: install the CUDA toolkit or put its bin on PATH"
fi

# 1. The node's Python: built once, completed if a build was cut short.
started=$(date +%s)
if [[ ! -x $PARENT/bin/python ]]; then
  twin_python=${TWIN_PYTHON:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -1)}
  [[ -n $twin_python ]] || die "no Python 3.12 for the node's Python: install one (pyenv install 3.12) or set TWIN_PYTHON=/path/to/python3.12"
  say "creating the node's Python in $PARENT with $twin_python"
  "$twin_python" -m venv "$PARENT"
fi
[[ $("$PARENT/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == 3.12 ]] \
  || die "$PARENT is not a Python 3.12 venv, as the node's is: remove it (rm -rf $PARENT) and rerun"
if ! "$PARENT/bin/python" -c "import $(IFS=,; echo "${NODE_MODULES[*]}")" 2>/dev/null; then
  say "installing the node's packages into $PARENT (about 5 GB)"
  "$PARENT/bin/python" -m pip install -q "${NODE_PACKAGES[@]}"
fi
say "the node's Python: $PARENT, torch $("$PARENT/bin/python" -c 'import torch; print(torch.__version__)') ($(since "$started"))"

# 2. What travels: the project's files (tracked, and untracked ones git does not ignore) and the offline
# folder the project's own gpu_check.sh fills, online.
rm -rf "$WORK"
mkdir -p "$WORK/megdet"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
   [[ -e $file ]] && printf '%s\0' "$file"
 done | tar --null -T - -cf -) | tar -xf - -C "$WORK/megdet"
started=$(date +%s)
fetch_args=(--fetch "$WORK/offline")
(( ! horovod )) || fetch_args+=(--horovod)
bash "$WORK/megdet/scripts/gpu_check.sh" "${fetch_args[@]}"
say "fetched in $(since "$started"): $(ls "$WORK/offline" | tr '\n' ' ')"
travel_bytes() { du -sb "$1" | cut -f1; }
project=$(travel_bytes "$WORK/megdet") offline=$(travel_bytes "$WORK/offline")
travel=$(awk -v p="$project" -v o="$offline" 'BEGIN { printf "project %.1f MB + offline folder %.1f MB = %.1f MB", p / 1e6, o / 1e6, (p + o) / 1e6 }')
(( project + offline < TRAVEL_LIMIT_MB * 1000000 )) \
  || die "what travels to the node is $travel, over $TRAVEL_LIMIT_MB MB: fetch less (gpu_check.sh --fetch) or slim the project"
say "what travels to the node: $travel (limit $TRAVEL_LIMIT_MB MB)"

# 3. On the node, offline: python3 is the node's venv's (its bin first on PATH, cmake and ninja with it),
# no pip configuration of this machine's, no CUDA_HOME (set-up asks nvcc).
node_env=(PATH="$PARENT/bin:$PATH" MEGDET_TORCH=system MEGDET_OFFLINE_DIR="$WORK/offline"
          MEGDET_WHEEL_CACHE="$WORK/wheels" PIP_CONFIG_FILE=/dev/null)
check_args=(--cpu --out "$WORK/out") archs=
if (( horovod )); then
  # The node's torch lists these with torch.cuda.get_arch_list(), which splits this very string of its
  # build; without a GPU it returns [] and set-up would have no architectures to build for.
  archs=$("$PARENT/bin/python" -c 'import torch; print(",".join(a.split("_")[1] for a in torch._C._cuda_getArchFlags().split()))')
  say "the node's GPU architectures (torch's build): $archs"
  node_env+=(HOROVOD_BUILD_CUDA_CC_LIST="$archs")
  check_args+=(--horovod)
fi
started=$(date +%s)
status=0
unshare --net env -u CUDA_HOME $(compgen -e | grep -E '^(PIP_|MEGDET_|HOROVOD_)' | sed 's/^/-u /') \
  "${node_env[@]}" bash -c '
    set -euo pipefail
    ip link set lo up
    if python3 -c "import socket; socket.create_connection((\"pypi.org\", 443), timeout=5)" 2>/dev/null; then
      echo "[node_twin] error: the network is not cut" >&2; exit 1
    fi
    echo "[node_twin] network cut: pypi.org unreachable; python3 is $(command -v python3)"
    cd "$0"
    bash scripts/gpu_check.sh "$@"
    if [[ " $* " == *" --horovod "* ]]; then .venv/bin/horovodrun --check-build; fi' \
  "$WORK/megdet" "${check_args[@]}" || status=$?
say "offline set-up and check: $(since "$started"), status $status; results in $WORK/out${archs:+, the log of the Horovod build in $WORK/wheels/logs}"
exit "$status"
