#!/usr/bin/env bash
# The project's test command (README "Tests"; CI runs it through .ci/run):
#
#   bash scripts/test.sh [pytest args]     e.g.  bash scripts/test.sh -x -q test/test_vision_msgs.py
#
# Sets up the venv (scripts/setup_env.sh), lints with ruff, then runs pytest (test/) with ROS
# discovery confined to loopback. Exits non-zero on any failure, including "no tests collected".
# Env: MOOG_VENV (venv folder), MOOG_TEST_TIMEOUT (per-test seconds, default 300),
#      ROS_DOMAIN_ID (base for the per-module domain ids chosen in test/conftest.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOOG_VENV:-$REPO/.venv}"
log() { printf '[test] %s\n' "$*" >&2; }

bash "$REPO/scripts/setup_env.sh"

# The venv is self-contained; a sourced ROS 2 workspace would mix two builds of rclpy.
if [[ -n "${PYTHONPATH:-}" ]]; then
  log "ignoring PYTHONPATH=$PYTHONPATH (the venv carries everything the tests need)"
  unset PYTHONPATH
fi
# Never let DDS discovery leave this machine; every ROS test stays on 127.0.0.1.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-77}"
export AMENT_PREFIX_PATH="$VENV"
# Torch tests use tiny configs; more threads than cores only adds contention on CI's 2 cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="$OMP_NUM_THREADS"

cd "$REPO"
# Lint and tests both run so CI shows every problem at once; either failing fails the command.
log 'ruff check'
lint_rc=0
"$VENV/bin/ruff" check . || lint_rc=$?

log "pytest (ROS_DOMAIN_ID base $ROS_DOMAIN_ID)"
test_rc=0
# No path given: pyproject's testpaths (test/) applies, so a file argument narrows the run.
"$VENV/bin/python" -m pytest --timeout="${MOOG_TEST_TIMEOUT:-300}" "$@" || test_rc=$?
if (( test_rc == 5 )); then
  log 'pytest collected no tests; treating that as a failure'
fi
if (( lint_rc != 0 )); then
  log "ruff check failed (exit $lint_rc)"
fi
if (( test_rc != 0 || lint_rc != 0 )); then
  exit 1
fi
log 'lint and tests passed'
