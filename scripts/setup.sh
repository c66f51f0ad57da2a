#!/usr/bin/env bash
# Set up .venv with everything megdet needs: torch, MPI + mpi4py, Horovod (PyTorch + Gloo + MPI [+ NCCL]),
# and megdet itself (editable). Idempotent: a stamp in .venv skips the work when nothing changed.
#
#   bash scripts/setup.sh            # what `make demo` and `make test` run first
#   MEGDET_FORCE_SETUP=1 bash ...    # redo every step
#
# The Horovod wheel is built once per (Horovod, torch, Python, MPI, CUDA) and cached in
# ${MEGDET_WHEEL_CACHE:-~/.cache/megdet/wheels}, so a fresh clone does not rebuild it.
set -euo pipefail

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
WHEEL_CACHE=${MEGDET_WHEEL_CACHE:-$HOME/.cache/megdet/wheels}

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

stamp_inputs() { cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/check_horovod_build.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml"; }
STAMP=$VENV/.megdet-setup-$(stamp_inputs | sha256sum | cut -c1-16)
if [[ -f $STAMP && -z ${MEGDET_FORCE_SETUP:-} ]]; then
  say "up to date ($STAMP)"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 9))' \
  || die "Python >= 3.9 is required, $PYTHON is $("$PYTHON" -V 2>&1); set PYTHON=python3.11"
[[ -x $VENV/bin/python ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PATH=$VENV/bin:$PATH

have_root() { [[ $(id -u) == 0 ]]; }
apt_install() {
  have_root && command -v apt-get >/dev/null || die "need Debian packages $*; install them (apt-get install $*)"
  say "apt-get install $*"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. Python packages. torch is pinned: the CPU wheel here, the CUDA build on a GPU cluster.
say "installing torch==$TORCH_VERSION and the Python dependencies"
"${PIP[@]}" install -q "setuptools>=64" wheel "torch==$TORCH_VERSION"
"${PIP[@]}" install -q numpy h5py pycocotools Pillow tqdm PyYAML matplotlib pytest cloudpickle psutil

# 2. MPI: the system's when mpicc is on PATH (outside the venv), else the mpich wheel from PyPI.
system_mpicc=$(PATH=${PATH#"$VENV/bin:"} command -v mpicc || true)
if [[ -n $system_mpicc ]]; then
  say "using the system MPI: $system_mpicc"
else
  say "no mpicc on PATH: installing the mpich wheel"
  "${PIP[@]}" install -q mpich
fi
command -v mpicc >/dev/null || die "no mpicc after installing MPI; install an MPI (apt-get install libmpich-dev) or 'pip install mpich'"
MPI_VERSION=$( (mpichversion 2>/dev/null | head -1) || (ompi_info --version 2>/dev/null | head -1) || mpicc -show)
MPI_VERSION=$(echo "$MPI_VERSION" | tr -s ' \t:' '-' | tr -cd 'A-Za-z0-9.-' | cut -c1-40)
"${PIP[@]}" install -q mpi4py
"$VENV/bin/python" -c 'from mpi4py import MPI; MPI.Get_library_version()' \
  || die "mpi4py cannot load the MPI library next to $(command -v mpicc)"

# 3. Horovod from its sdist, with the upstream C++17 fix (master 3a31d93, PR #3998), cached as a wheel.
# NCCL operations only with a CUDA build of torch (nvcc alone, as on a CPU-only box, is not enough).
TORCH_CUDA=$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')
if [[ -n $TORCH_CUDA ]] && command -v nvcc >/dev/null; then CUDA_TAG=cuda$TORCH_CUDA; else CUDA_TAG=cpu; fi
PY_TAG=$("$VENV/bin/python" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
TORCH_TAG=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
KEY=horovod-$HOROVOD_VERSION-torch$TORCH_TAG-$PY_TAG-$MPI_VERSION-$CUDA_TAG
CACHED=$WHEEL_CACHE/$KEY
if ! ls "$CACHED"/horovod-*.whl >/dev/null 2>&1; then
  cmake_major=$( (cmake --version 2>/dev/null || true) | sed -n 's/cmake version \([0-9]*\).*/\1/p')
  if [[ -z $cmake_major || $cmake_major -ge 4 ]]; then apt_install cmake; fi
  command -v g++ >/dev/null || apt_install g++
  [[ $(cmake --version | sed -n 's/cmake version \([0-9]*\).*/\1/p') -lt 4 ]] \
    || die "cmake >= 4 on PATH ($(command -v cmake)) rejects Gloo's cmake_minimum_required; put cmake 3.x first on PATH"
  say "building Horovod $HOROVOD_VERSION ($KEY); this takes 4-7 minutes on 2 cores"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
  tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
  src=$build/horovod-$HOROVOD_VERSION
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
    && die "the C++17 patch did not apply to Horovod $HOROVOD_VERSION"
  gpu_env=()
  [[ $CUDA_TAG != cpu ]] && gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL)
  env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 "${gpu_env[@]}" \
      MAKEFLAGS=-j$(nproc) \
      "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$build/wheel" "$src" > "$build/build.log" 2>&1 \
    || { tail -40 "$build/build.log" >&2; die "Horovod build failed (log above)"; }
  mkdir -p "$CACHED"
  cp "$build"/wheel/horovod-*.whl "$CACHED/"
  say "cached the Horovod wheel in $CACHED"
else
  say "reusing the cached Horovod wheel in $CACHED"
fi
"${PIP[@]}" install -q --force-reinstall --no-deps "$CACHED"/horovod-*.whl
"${PIP[@]}" install -q cloudpickle psutil pyyaml packaging  # Horovod's runtime deps

bash "$ROOT/scripts/check_horovod_build.sh"

# 4. megdet itself.
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
rm -f "$VENV"/.megdet-setup-*
touch "$STAMP"
say "done"
