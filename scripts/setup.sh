#!/usr/bin/env bash
# Set up .venv with everything megdet needs: torch and the torchvision that matches it, Horovod (PyTorch +
# Gloo, + MPI when there is one, + NCCL when torch has CUDA) and megdet itself (editable).
# Idempotent: a stamp in .venv skips the work when nothing changed.
#
#   bash scripts/setup.sh                      # what `make demo` and `make test` run first: torch==2.13.0,
#                                              # MPI (the system's, else the mpich wheel) and Horovod
#   MEGDET_TORCH=system bash scripts/setup.sh  # keep the torch python3 already has (a cluster module, a
#                                              # container, a venv): .venv sees python3's packages
#   MEGDET_OFFLINE_DIR=DIR bash ...            # no index: wheels and Horovod's sdist from DIR alone
#                                              # (scripts/gpu_check.sh --fetch DIR fills it)
#   MEGDET_SKIP_HOROVOD=1 bash ...             # everything but Horovod and MPI (scripts/gpu_check.sh: its
#                                              # checks run on torch.distributed; --horovod builds it too)
#   HOROVOD_BUILD_CUDA_CC_LIST=75,80,90 bash ...   # the GPU architectures Horovod is built for (default:
#                                              # torch.cuda.get_arch_list(), empty without a GPU)
#   MEGDET_FORCE_SETUP=1 bash ...              # redo every step
#
# The Horovod wheel is built once per (Horovod, torch, Python, MPI, CUDA architectures) and cached in
# ${MEGDET_WHEEL_CACHE:-~/.cache/megdet/wheels}, so a fresh clone does not rebuild it; the build's log
# stays in its logs/ folder. Sourcing this file defines the steps as functions and runs nothing.
set -euo pipefail

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TORCH_MINORS=(11 13)            # the tested torch 2.11 to 2.13: setup.cfg's install_requires range
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
WHEEL_CACHE=${MEGDET_WHEEL_CACHE:-$HOME/.cache/megdet/wheels}
TORCH_CHOICE=${MEGDET_TORCH:-$TORCH_VERSION}
OFFLINE=${MEGDET_OFFLINE_DIR:-}
PARENT_PTH=megdet-parent-site.pth   # in .venv's site-packages when MEGDET_TORCH=system

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }
py() { "$VENV/bin/python" -c "$@"; }
run_pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# pip install "$@": from the index, or with MEGDET_OFFLINE_DIR from that folder alone (pip takes
# --no-index and --find-links after its subcommand). A requirement the folder lacks is one line.
pip_install() {
  if [[ -z $OFFLINE ]]; then
    run_pip install -q "$@"
    return
  fi
  local out missing
  if out=$(run_pip install -q --no-index --find-links "$OFFLINE" "$@" 2>&1); then
    [[ -z $out ]] || echo "$out"
    return
  fi
  missing=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' <<<"$out" | head -1)
  local requirement=$missing
  [[ $requirement =~ ^[A-Za-z0-9._-]+$ ]] || requirement=\"$requirement\"
  [[ -z $missing ]] || die "MEGDET_OFFLINE_DIR=$OFFLINE has no $missing: add it on a machine that reaches PyPI with 'bash scripts/gpu_check.sh --fetch $OFFLINE $requirement' and carry the folder over"
  echo "$out" >&2
  die "pip install $* from MEGDET_OFFLINE_DIR=$OFFLINE failed (pip's output above)"
}

# The torch python3 has, for MEGDET_TORCH=system: importable and in the tested range, else one line.
# Sets SYSTEM_TORCH_CUDA (its CUDA version, empty for a CPU build).
check_system_torch() {
  local version
  read -r version SYSTEM_TORCH_CUDA < <("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "")' 2>/dev/null) \
    || die "MEGDET_TORCH=system but $PYTHON cannot import torch: load the cluster's torch (module load, container), or unset MEGDET_TORCH"
  local major=${version%%.*} minor=${version#*.}
  minor=${minor%%.*}
  [[ $major == 2 && $minor -ge ${TORCH_MINORS[0]} && $minor -le ${TORCH_MINORS[1]} ]] \
    || die "$PYTHON has torch $version, outside the tested 2.${TORCH_MINORS[0]} to 2.${TORCH_MINORS[1]}: load a torch in that range, or unset MEGDET_TORCH to install torch==$TORCH_VERSION in $VENV"
}

# The .pth line that adds python3's package folders in its own order: a venv's site-packages (and its
# base's, when it includes them) and the user site. `venv --system-site-packages` would give .venv the
# *base* interpreter's packages instead, so a python3 that is itself a venv's would lose its torch.
PARENT_PTH_LINE='
import site, sys
dirs = set(site.getsitepackages())
if site.ENABLE_USER_SITE:
    dirs.add(site.getusersitepackages())
print("import site; " + "; ".join(f"site.addsitedir({path!r})" for path in sys.path if path in dirs))'

# .venv on top of python3's packages: a .pth whose site.addsitedir() adds python3's package folders after
# .venv's own (addsitedir, so their .pth files load too). What .venv installs shadows them. pip too comes
# from python3 when it has one (no ensurepip, which some system Pythons lack).
make_venv_on_parent() {
  local site_packages
  if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV on top of $PYTHON's packages"
    "$PYTHON" -m venv --without-pip "$VENV"
  fi
  site_packages=$(py 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$PYTHON" -c "$PARENT_PTH_LINE" > "$site_packages/$PARENT_PTH"
  if run_pip --version >/dev/null 2>&1; then
    # .venv/bin/pip, so that an activated .venv installs into .venv, not into python3's environment.
    printf '#!/bin/sh\nexec "%s" -m pip "$@"\n' "$VENV/bin/python" > "$VENV/bin/pip"
    chmod +x "$VENV/bin/pip"
  else
    say "$PYTHON has no pip: installing Python's own into $VENV"
    "$VENV/bin/python" -m ensurepip --default-pip >/dev/null
  fi
}

# The CUDA toolkit's folder: $CUDA_HOME, else the one nvcc itself names (`nvcc -dryrun` prints TOP=),
# since the nvcc on PATH may be a wrapper outside the toolkit.
cuda_home() {
  if [[ -n ${CUDA_HOME:-} ]]; then
    echo "$CUDA_HOME"
    return
  fi
  local top
  top=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [[ -n $top ]] || die "'nvcc -dryrun' names no TOP= folder: set CUDA_HOME to the CUDA toolkit's folder"
  realpath "$top"
}

# The GPU architectures to build for, "75,80,...": HOROVOD_BUILD_CUDA_CC_LIST, else the venv torch's.
cuda_archs() {
  if [[ -n ${HOROVOD_BUILD_CUDA_CC_LIST:-} ]]; then
    echo "$HOROVOD_BUILD_CUDA_CC_LIST"
    return
  fi
  local archs
  archs=$(py 'import torch; print(",".join(sorted({a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}, key=int)))')
  [[ -n $archs ]] || die "torch lists no sm_ architectures (torch.cuda.get_arch_list() is empty without a GPU): set HOROVOD_BUILD_CUDA_CC_LIST, e.g. 75,80,86,90,100,120"
  echo "$archs"
}

require_nvcc() {
  command -v nvcc >/dev/null \
    || die "torch has CUDA but nvcc is not on PATH: load the CUDA toolkit (module load cuda, or its bin on PATH) so Horovod builds its NCCL operations, or set MEGDET_SKIP_HOROVOD=1 (gpu_check.sh without --horovod)"
}

have_root() { [[ $(id -u) == 0 ]]; }
apt_install() {
  [[ -z $OFFLINE ]] && have_root && command -v apt-get >/dev/null || die "need Debian packages $*; install them (apt-get install $*)"
  say "apt-get install $*"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The requirements among "$@" (module=requirement) the venv lacks: the module does not import, or is older
# than a requirement's ">=" version. One process.
missing_requirements() {
  py '
import importlib, re, sys
numbers = lambda version: [int(n) for n in re.findall(r"\d+", version)[:3]]
for pair in sys.argv[1:]:
    module, requirement = pair.split("=", 1)
    try:
        version = getattr(importlib.import_module(module), "__version__", "")
    except Exception:
        print(requirement)
        continue
    if ">=" in requirement and numbers(version) < numbers(requirement.split(">=")[1]):
        print(requirement)' "$@"
}

# MPI for Horovod: the system's when mpicc is on PATH (outside the venv), else the mpich wheel from the
# index or from MEGDET_OFFLINE_DIR. With neither, Horovod is built without MPI, and says so.
# Sets MPI_TAG (part of the wheel's cache key) and MPI_FLAG.
choose_mpi() {
  local system_mpicc
  system_mpicc=$(PATH=${PATH#"$VENV/bin:"} command -v mpicc || true)
  if [[ -n $system_mpicc ]]; then
    say "MPI: the system's ($system_mpicc)"
  elif [[ -x $VENV/bin/mpicc ]]; then
    say "MPI: the mpich wheel in $VENV"
  elif [[ -z $OFFLINE ]] || compgen -G "$OFFLINE/mpich-*.whl" >/dev/null; then
    say "MPI: no mpicc on PATH, installing the mpich wheel"
    pip_install mpich
  else
    say "MPI: none (no mpicc on PATH, no mpich wheel in MEGDET_OFFLINE_DIR): Horovod is built with Gloo and without MPI; start it with horovodrun or torchrun, not mpirun or srun"
    MPI_TAG=nompi MPI_FLAG=HOROVOD_WITHOUT_MPI=1
    return
  fi
  command -v mpicc >/dev/null || die "no mpicc after installing MPI; install an MPI (apt-get install libmpich-dev) or 'pip install mpich'"
  MPI_TAG=$( (mpichversion 2>/dev/null | head -1) || (ompi_info --version 2>/dev/null | head -1) || mpicc -show)
  MPI_TAG=$(echo "$MPI_TAG" | tr -s ' \t:' '-' | tr -cd 'A-Za-z0-9.-' | cut -c1-40)
  MPI_FLAG=HOROVOD_WITH_MPI=1
  [[ -z $(missing_requirements mpi4py=mpi4py) ]] || pip_install mpi4py
  py 'from mpi4py import MPI; MPI.Get_library_version()' \
    || die "mpi4py cannot load the MPI library next to $(command -v mpicc)"
}

# Build the Horovod wheel into $1 from its sdist, with the upstream C++17 fix (master 3a31d93, PR #3998).
# Extra build variables come as "$@" (NAME=value). The log stays in $WHEEL_CACHE/logs/, named on failure.
build_horovod_wheel() {
  local out=$1 build src log nccl_dir
  shift
  local build_env=("$@")
  log=$WHEEL_CACHE/logs/$(basename "$out").log
  mkdir -p "$WHEEL_CACHE/logs"
  build=$(mktemp -d)
  trap "rm -rf '$build'" EXIT
  if [[ -n $OFFLINE ]]; then
    [[ -f $OFFLINE/horovod-$HOROVOD_VERSION.tar.gz ]] \
      || die "MEGDET_OFFLINE_DIR=$OFFLINE has no horovod-$HOROVOD_VERSION.tar.gz: fill it with 'bash scripts/gpu_check.sh --fetch $OFFLINE --horovod' on a machine that reaches PyPI"
    cp "$OFFLINE/horovod-$HOROVOD_VERSION.tar.gz" "$build/"
  else
    run_pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
  fi
  tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
  src=$build/horovod-$HOROVOD_VERSION
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  ! grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
    || die "the C++17 patch did not apply to Horovod $HOROVOD_VERSION"
  if [[ -n ${NCCL_DIR:-} ]]; then
    # Horovod's FindNCCL looks for libnccl.so; the wheel ships only the versioned libnccl.so.2.
    mkdir -p "$build/nccl-lib"
    ln -s "$NCCL_DIR/lib/libnccl.so.2" "$build/nccl-lib/libnccl.so"
    build_env+=(HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$build/nccl-lib")
  fi
  # CMAKE_POLICY_VERSION_MINIMUM lets cmake >= 4 configure Gloo (cmake_minimum_required 2.8.12); 3.x ignores it.
  if ! (export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
         CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" ${build_env[@]+"${build_env[@]}"}
         run_pip wheel --no-build-isolation --no-deps ${OFFLINE:+--no-index --find-links "$OFFLINE"} \
           -w "$build/wheel" "$src") > "$log" 2>&1; then
    { grep -E -m 20 'CMake Error|Could NOT find|error:|Error:' "$log" || tail -n 20 "$log"; } >&2
    die "Horovod build failed (its errors above); the whole log is $log"
  fi
  mkdir -p "$out"
  cp "$build"/wheel/horovod-*.whl "$out/"
}

# Horovod from its sdist, cached as a wheel: PyTorch and Gloo, MPI when there is one, and NCCL for the
# GPU architectures wanted when torch has CUDA.
install_horovod() {
  local torch_cuda cuda_tag=cpu gpu_env=() key cached cmake_version check_args=()
  NCCL_DIR=
  torch_cuda=$(py 'import torch; print(torch.version.cuda or "")')
  if [[ -n $torch_cuda ]]; then
    require_nvcc
    local archs toolkit
    archs=$(cuda_archs)
    toolkit=$(cuda_home)
    cuda_tag=cuda$torch_cuda-sm${archs//,/-}
    # NCCL: the nvidia-nccl wheel torch brings (a namespace package: its __path__, not __file__), else the system's.
    NCCL_DIR=$(py 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
    say "CUDA: toolkit $toolkit, architectures $archs, NCCL ${NCCL_DIR:-of the system}"
    # CUDA_HOME too: Horovod's FindPytorch asks torch.utils.cpp_extension for the CUDA libraries' folder,
    # which without it takes the parent of nvcc's folder (/usr/local for a wrapper in /usr/local/bin).
    gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$toolkit" CUDA_HOME="$toolkit"
             HOROVOD_BUILD_CUDA_CC_LIST="$archs" HOROVOD_NCCL_LINK=SHARED)
  fi
  choose_mpi
  key=horovod-$HOROVOD_VERSION-torch$(py 'import torch; print(torch.__version__.replace("+", "_"))')
  key+=-$(py 'import sys; print("py%d%d" % sys.version_info[:2])')-$MPI_TAG-$cuda_tag
  cached=$WHEEL_CACHE/$key
  if ls "$cached"/horovod-*.whl >/dev/null 2>&1; then
    say "reusing the cached Horovod wheel in $cached"
  else
    command -v g++ >/dev/null || apt_install g++
    # Horovod wants cmake >= 3.13 (else it pip-installs one, online) and cffi at build time (setup_requires).
    cmake_version=$( (cmake --version 2>/dev/null || true) | sed -n 's/cmake version \([0-9.]*\).*/\1/p')
    [[ -n $cmake_version ]] && printf '3.13\n%s\n' "$cmake_version" | sort -C -V || pip_install "cmake>=3.13"
    [[ -z $(missing_requirements cffi=cffi) ]] || pip_install "cffi>=1.4.0"
    say "building Horovod $HOROVOD_VERSION ($key) with $(cmake --version | head -1); 4-7 minutes on 2 cores"
    build_horovod_wheel "$cached" "$MPI_FLAG" ${gpu_env[@]+"${gpu_env[@]}"}
    say "cached the Horovod wheel in $cached"
  fi
  pip_install --force-reinstall --no-deps "$cached"/horovod-*.whl
  [[ $MPI_TAG != nompi ]] || check_args=(--without-mpi)
  bash "$ROOT/scripts/check_horovod_build.sh" ${check_args[@]+"${check_args[@]}"}
}

stamp_inputs() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/check_horovod_build.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml"
  echo "torch=$TORCH_CHOICE offline=${OFFLINE:+yes}"
  [[ $TORCH_CHOICE != system ]] \
    || echo "python=$(command -v "$PYTHON") $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>&1)"
}

main() {
  local stamp horovod=yes
  [[ -z ${MEGDET_SKIP_HOROVOD:-} ]] || horovod=no
  stamp=$VENV/.megdet-setup-$(stamp_inputs | sha256sum | cut -c1-16)
  # A set-up with Horovod also serves one that skips it.
  if [[ -f $stamp && -z ${MEGDET_FORCE_SETUP:-} ]] && [[ $horovod == no || $(cat "$stamp") == horovod=yes ]]; then
    say "up to date ($stamp)"
    return
  fi

  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 9))' \
    || die "Python >= 3.9 is required, $PYTHON is $("$PYTHON" -V 2>&1); set PYTHON=python3.11"
  if [[ -n $OFFLINE ]]; then
    [[ -d $OFFLINE ]] || die "MEGDET_OFFLINE_DIR=$OFFLINE is not a folder: fill it with 'bash scripts/gpu_check.sh --fetch $OFFLINE' on a machine that reaches PyPI"
    OFFLINE=$(cd "$OFFLINE" && pwd)
  fi
  local parent_pth
  parent_pth=$(compgen -G "$VENV/lib/python3*/site-packages/$PARENT_PTH" || true)
  if [[ $TORCH_CHOICE == system ]]; then
    check_system_torch
    [[ $horovod == no || -z $SYSTEM_TORCH_CUDA ]] || require_nvcc
    [[ ! -x $VENV/bin/python || -n $parent_pth ]] \
      || die "$VENV was made without $PYTHON's packages, which MEGDET_TORCH=system needs: remove it (rm -rf $VENV) and rerun"
    make_venv_on_parent
  else
    [[ -z $parent_pth ]] \
      || die "$VENV sees another python's packages (MEGDET_TORCH=system made it): remove it (rm -rf $VENV) and rerun, or set MEGDET_TORCH=system"
    [[ -x $VENV/bin/python ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  fi
  export PATH=$VENV/bin:$PATH

  # 1. torch: the pinned CPU or CUDA wheel, or (MEGDET_TORCH=system) the one python3 has.
  if [[ $TORCH_CHOICE == system ]]; then
    say "using $PYTHON's torch $(py 'import torch; print(torch.__version__)')"
  else
    say "installing torch==$TORCH_CHOICE"
    pip_install "setuptools>=70.1" "torch==$TORCH_CHOICE"
  fi
  local torch_minor
  torch_minor=$(py 'import torch; print(torch.__version__.split(".")[1])')
  [[ $torch_minor -ge ${TORCH_MINORS[0]} && $torch_minor -le ${TORCH_MINORS[1]} ]] \
    || say "warning: torch $(py 'import torch; print(torch.__version__)') is outside the tested 2.${TORCH_MINORS[0]} to 2.${TORCH_MINORS[1]}"

  # 2. torchvision of the same release (torch 2.N pairs with torchvision 0.(N+15)). Its compiled nms and
  # roi_align run on GPUs; the PyPI wheels are CUDA builds, which do not load beside a CPU torch, where
  # megdet uses its pure-PyTorch ops (the run's banner says which).
  local torchvision have_vision
  torchvision="0.$((torch_minor + 15))"
  have_vision=$(py 'import importlib.metadata as m; print(m.version("torchvision"))' 2>/dev/null || true)
  if [[ $have_vision != "$torchvision".* ]]; then
    say "installing torchvision==$torchvision.* (matches torch 2.$torch_minor)"
    pip_install --no-deps "torchvision==$torchvision.*"
  fi

  # 3. The other Python dependencies (those python3's packages lack with MEGDET_TORCH=system). setuptools
  # >= 70.1 builds wheels (megdet's editable install, Horovod's) without the wheel package.
  local need
  need=$(missing_requirements numpy=numpy h5py=h5py pycocotools=pycocotools PIL=Pillow tqdm=tqdm yaml=PyYAML \
         matplotlib=matplotlib tensorboard=tensorboard pytest=pytest cloudpickle=cloudpickle psutil=psutil \
         packaging=packaging setuptools="setuptools>=70.1")
  [[ -z $need ]] || { say "installing $(echo $need)"; pip_install $need; }

  # 4. Horovod, and the MPI it is built with.
  if [[ $horovod == yes ]]; then
    install_horovod
  else
    say "MEGDET_SKIP_HOROVOD: no Horovod and no MPI (the torch and local engines run)"
  fi

  # 5. megdet itself.
  pip_install --no-build-isolation --no-deps -e "$ROOT"
  rm -f "$VENV"/.megdet-setup-*
  echo "horovod=$horovod" > "$stamp"
  say "done"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main
fi
