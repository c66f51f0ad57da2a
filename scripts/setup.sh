#!/usr/bin/env bash
# Set up .venv with everything megdet needs: torch and the torchvision that matches it, MPI + mpi4py,
# Horovod (PyTorch + Gloo + MPI, + NCCL when torch has CUDA), and megdet itself (editable).
# Idempotent: a stamp in .venv skips the work when nothing changed.
#
#   bash scripts/setup.sh                      # what `make demo` and `make test` run first
#   MEGDET_TORCH=system bash scripts/setup.sh  # keep the torch already importable (a cluster module or
#                                              # container): the venv sees the system site-packages
#   MEGDET_OFFLINE_DIR=DIR bash ...            # no index: wheels and Horovod's sdist from DIR
#                                              # (scripts/gpu_check.sh --fetch DIR fills it)
#   MEGDET_SKIP_HOROVOD=1 bash ...             # everything but Horovod (scripts/gpu_check.sh: its checks
#                                              # run on torch.distributed; --horovod builds it too)
#   MEGDET_FORCE_SETUP=1 bash ...              # redo every step
#
# The Horovod wheel is built once per (Horovod, torch, Python, MPI, CUDA architectures) and cached in
# ${MEGDET_WHEEL_CACHE:-~/.cache/megdet/wheels}, so a fresh clone does not rebuild it.
set -euo pipefail

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TESTED_TORCH="2.11 to 2.13"     # setup.cfg's install_requires range
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
WHEEL_CACHE=${MEGDET_WHEEL_CACHE:-$HOME/.cache/megdet/wheels}
TORCH_CHOICE=${MEGDET_TORCH:-$TORCH_VERSION}
OFFLINE=${MEGDET_OFFLINE_DIR:-}

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

stamp_inputs() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/check_horovod_build.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml"
  echo "torch=$TORCH_CHOICE offline=${OFFLINE:+yes} skip_horovod=${MEGDET_SKIP_HOROVOD:-}"
}
STAMP=$VENV/.megdet-setup-$(stamp_inputs | sha256sum | cut -c1-16)
if [[ -f $STAMP && -z ${MEGDET_FORCE_SETUP:-} ]]; then
  say "up to date ($STAMP)"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 9))' \
  || die "Python >= 3.9 is required, $PYTHON is $("$PYTHON" -V 2>&1); set PYTHON=python3.11"
if [[ -n $OFFLINE && ! -d $OFFLINE ]]; then
  die "MEGDET_OFFLINE_DIR=$OFFLINE is not a folder: fill it with 'bash scripts/gpu_check.sh --fetch $OFFLINE' on a machine online"
fi
if [[ $TORCH_CHOICE == system ]]; then
  "$PYTHON" -c 'import torch' 2>/dev/null \
    || die "MEGDET_TORCH=system but $PYTHON cannot import torch: load the cluster's torch (module load, container), or unset MEGDET_TORCH"
  if [[ -x $VENV/bin/python ]] && ! grep -q 'include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    die "$VENV was made without the system site-packages that MEGDET_TORCH=system needs: remove it (rm -rf $VENV) and rerun"
  fi
  [[ -x $VENV/bin/python ]] || { say "creating $VENV (with the system site-packages)"; "$PYTHON" -m venv --system-site-packages "$VENV"; }
else
  [[ -x $VENV/bin/python ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
[[ -n $OFFLINE ]] && PIP+=(--no-index --find-links "$OFFLINE")
PY=("$VENV/bin/python" -c)
export PATH=$VENV/bin:$PATH

have_root() { [[ $(id -u) == 0 ]]; }
apt_install() {
  have_root && command -v apt-get >/dev/null || die "need Debian packages $*; install them (apt-get install $*)"
  say "apt-get install $*"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing_modules() {  # the Python modules among "$@" (module=distribution) the venv cannot import
  for pair in "$@"; do
    "${PY[@]}" "import ${pair%%=*}" 2>/dev/null || echo "${pair#*=}"
  done
}

# 1. torch: the pinned CPU or CUDA wheel, or (MEGDET_TORCH=system) the one already importable.
if [[ $TORCH_CHOICE == system ]]; then
  say "using the system torch $("${PY[@]}" 'import torch; print(torch.__version__)')"
else
  say "installing torch==$TORCH_CHOICE"
  "${PIP[@]}" install -q "setuptools>=64" wheel "torch==$TORCH_CHOICE"
fi
TORCH_MINOR=$("${PY[@]}" 'import torch; print(torch.__version__.split(".")[1])')
[[ $("${PY[@]}" 'import torch; print(torch.__version__.split(".")[0])') == 2 && $TORCH_MINOR -ge 11 && $TORCH_MINOR -le 13 ]] \
  || say "warning: torch $("${PY[@]}" 'import torch; print(torch.__version__)') is outside the tested range ($TESTED_TORCH)"

# 2. torchvision of the same release (torch 2.N pairs with torchvision 0.(N+15)). Its compiled nms and
# roi_align run on GPUs; the PyPI wheels are CUDA builds, which do not load beside a CPU torch, where
# megdet uses its pure-PyTorch ops (the run's banner says which).
TORCHVISION="0.$((TORCH_MINOR + 15))"
have_vision=$("${PY[@]}" 'import importlib.metadata as m; print(m.version("torchvision"))' 2>/dev/null || true)
if [[ $have_vision != "$TORCHVISION".* ]]; then
  say "installing torchvision==$TORCHVISION.* (matches torch 2.$TORCH_MINOR)"
  "${PIP[@]}" install -q --no-deps "torchvision==$TORCHVISION.*"
fi

# 3. The other Python dependencies (those a system site-packages lacks).
"${PIP[@]}" install -q "setuptools>=64" wheel
need=$(missing_modules numpy=numpy h5py=h5py pycocotools=pycocotools PIL=Pillow tqdm=tqdm yaml=PyYAML \
       matplotlib=matplotlib tensorboard=tensorboard pytest=pytest cloudpickle=cloudpickle psutil=psutil \
       packaging=packaging)
[[ -z $need ]] || "${PIP[@]}" install -q $need

# 4. MPI: the system's when mpicc is on PATH (outside the venv), else the mpich wheel from PyPI.
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
[[ -z $(missing_modules mpi4py=mpi4py) ]] || "${PIP[@]}" install -q mpi4py
"${PY[@]}" 'from mpi4py import MPI; MPI.Get_library_version()' \
  || die "mpi4py cannot load the MPI library next to $(command -v mpicc)"

# 5. Horovod from its sdist, with the upstream C++17 fix (master 3a31d93, PR #3998), cached as a wheel.
# NCCL operations with a CUDA build of torch and nvcc, for the GPU architectures torch was built for.
install_horovod() {
TORCH_CUDA=$("${PY[@]}" 'import torch; print(torch.version.cuda or "")')
gpu_env=()
CUDA_TAG=cpu
if [[ -n $TORCH_CUDA ]]; then
  command -v nvcc >/dev/null || die "torch $TORCH_CUDA has CUDA but nvcc is not on PATH: load the CUDA toolkit (module load cuda) so Horovod builds its NCCL operations"
  ARCHS=$("${PY[@]}" 'import torch; print(",".join(sorted({a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}, key=int)))')
  [[ -n $ARCHS ]] || die "torch $TORCH_CUDA lists no sm_ architectures (torch.cuda.get_arch_list()): give HOROVOD_BUILD_CUDA_CC_LIST yourself"
  CUDA_TAG=cuda$TORCH_CUDA-sm${ARCHS//,/-}
  # NCCL: the nvidia-nccl wheel torch brings (headers + libnccl.so.2), else the system's.
  NCCL_DIR=$("${PY[@]}" 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
  gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
           HOROVOD_BUILD_CUDA_CC_LIST="$ARCHS" HOROVOD_NCCL_LINK=SHARED)
fi
PY_TAG=$("${PY[@]}" 'import sys; print("py%d%d" % sys.version_info[:2])')
TORCH_TAG=$("${PY[@]}" 'import torch; print(torch.__version__.replace("+", "_"))')
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
  if [[ -n $OFFLINE ]]; then
    cp "$OFFLINE/horovod-$HOROVOD_VERSION.tar.gz" "$build/" \
      || die "no horovod-$HOROVOD_VERSION.tar.gz in MEGDET_OFFLINE_DIR=$OFFLINE: refill it with scripts/gpu_check.sh --fetch"
  else
    "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
  fi
  tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
  src=$build/horovod-$HOROVOD_VERSION
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
    && die "the C++17 patch did not apply to Horovod $HOROVOD_VERSION"
  if [[ -n ${NCCL_DIR:-} ]]; then
    # Horovod's FindNCCL looks for libnccl.so; the wheel ships only the versioned libnccl.so.2.
    mkdir -p "$build/nccl-lib"
    ln -s "$NCCL_DIR/lib/libnccl.so.2" "$build/nccl-lib/libnccl.so"
    gpu_env+=(HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$build/nccl-lib")
  fi
  env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 ${gpu_env[@]+"${gpu_env[@]}"} \
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

bash "$ROOT/scripts/check_horovod_build.sh"
}
if [[ -n ${MEGDET_SKIP_HOROVOD:-} ]]; then
  say "MEGDET_SKIP_HOROVOD: Horovod not installed (the torch and local engines still run)"
else
  install_horovod
fi

# 6. megdet itself.
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
rm -f "$VENV"/.megdet-setup-*
touch "$STAMP"
say "done"
