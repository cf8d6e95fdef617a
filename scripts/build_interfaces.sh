#!/usr/bin/env bash
# Build interfaces/vision_msgs against the ROS 2 pip wheels and install it into the venv prefix.
#
# vision_msgs has no PyPI wheel, so we generate it with the wheels' own ament/rosidl toolchain
# (cmake + ninja from pip). Installing into the venv prefix puts the Python package in
# site-packages, the libraries in $VENV/lib (which ros-wheels-bootstrapper adds to
# LD_LIBRARY_PATH at interpreter start) and the ament index entry in $VENV/share.
#
# Usage: scripts/build_interfaces.sh [VENV]   (default: $MOOG_VENV, else <repo>/.venv)
# Env:   MOOG_ROS_BUILD  build folder root (default <repo>/.ros_build)
#        MOOG_BUILD_JOBS parallel compile jobs (default: number of CPUs)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MOOG_VENV:-$REPO/.venv}}"
BUILD_ROOT="${MOOG_ROS_BUILD:-$REPO/.ros_build}"
SRC="$REPO/interfaces/vision_msgs"
BUILD="$BUILD_ROOT/vision_msgs"
JOBS="${MOOG_BUILD_JOBS:-$(nproc)}"

log() { printf '[build_interfaces] %s\n' "$*" >&2; }
die() { printf '[build_interfaces] error: %s\n' "$*" >&2; exit 1; }

PY="$VENV/bin/python"
[[ -x "$PY" ]] || die "no virtual environment at $VENV (run scripts/setup_env.sh first)"
[[ -x "$VENV/bin/cmake" && -x "$VENV/bin/ninja" ]] \
  || die "cmake/ninja missing from $VENV/bin (they come from requirements.txt)"
[[ -f "$SRC/package.xml" ]] || die "interface package not found at $SRC"
command -v c++ >/dev/null 2>&1 || die 'no C++ compiler (c++) on PATH; install build-essential'

# Local include folders that replace the manylinux build paths baked into the wheels.
read -r PY_INCLUDE NUMPY_INCLUDE < <(
  "$PY" -c 'import sysconfig, numpy; print(sysconfig.get_paths()["include"], numpy.get_include())'
)
[[ -f "$PY_INCLUDE/Python.h" ]] \
  || die "Python headers missing ($PY_INCLUDE/Python.h); install the python3-dev package"

# The wheels' exported CMake targets were generated inside the manylinux image and point at
# /opt/python/cpXY-cpXY/...; CMake refuses imported targets with non-existent include dirs.
# Rewrite them to this machine's folders. Idempotent: files already rewritten do not match.
mapfile -t baked < <(grep -rlE '/opt/python/cp[0-9]+-cp[0-9]+' "$VENV"/share/*/cmake 2>/dev/null || true)
if (( ${#baked[@]} )); then
  log "rewriting manylinux include paths in ${#baked[@]} CMake export files"
  sed -i -E \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python[0-9.]+/site-packages/numpy/_core/include#${NUMPY_INCLUDE}#g" \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python[0-9.]+#${PY_INCLUDE}#g" \
    "${baked[@]}"
  if grep -rqE '/opt/python/cp[0-9]+-cp[0-9]+' "${baked[@]}"; then
    die "unrecognised /opt/python path left in $VENV/share/*/cmake; extend the rewrite rules"
  fi
fi

# A build folder configured for another prefix would install there; start it afresh.
if [[ -f "$BUILD/CMakeCache.txt" ]] \
   && ! grep -qxF "CMAKE_INSTALL_PREFIX:PATH=$VENV" "$BUILD/CMakeCache.txt"; then
  log "build folder $BUILD was configured for another venv; removing it"
  rm -rf "$BUILD"
fi
mkdir -p "$BUILD"

export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
export PATH="$VENV/bin:$PATH"

log "configuring $SRC -> $BUILD (install prefix $VENV)"
cmake -S "$SRC" -B "$BUILD" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$PY" \
  >"$BUILD/configure.log" 2>&1 \
  || { tail -n 40 "$BUILD/configure.log" >&2; die "cmake configure failed (log: $BUILD/configure.log)"; }

log "building and installing with $JOBS jobs"
cmake --build "$BUILD" --target install --parallel "$JOBS" >"$BUILD/build.log" 2>&1 \
  || { tail -n 40 "$BUILD/build.log" >&2; die "build failed (log: $BUILD/build.log)"; }

# Prove it from a fresh interpreter: the import needs $VENV/lib on the loader path, which
# only the bootstrapper provides, and the ament index must list the package.
AMENT_PREFIX_PATH="$VENV" "$PY" - <<'PYEOF' || die 'vision_msgs was installed but does not import'
from ament_index_python.packages import get_package_share_directory
from vision_msgs.msg import Detection2DArray

get_package_share_directory('vision_msgs')
Detection2DArray()
PYEOF
log "vision_msgs installed into $VENV"
