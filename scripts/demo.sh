#!/usr/bin/env bash
# The project's main command (README "Demo"):
#
#   bash scripts/demo.sh [moog_demo args]      (see: bash scripts/demo.sh --help)
#
# Sets up the venv (scripts/setup_env.sh), then runs moog_demo with ROS discovery confined to
# loopback on its own domain id, so the demo never talks to other machines or ROS graphs.
# Env: MOOG_VENV (venv folder), ROS_DOMAIN_ID (default 42).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOOG_VENV:-$REPO/.venv}"

bash "$REPO/scripts/setup_env.sh"

# The venv is self-contained; a sourced ROS 2 workspace would mix two builds of rclpy.
if [[ -n "${PYTHONPATH:-}" ]]; then
  printf '[demo] ignoring PYTHONPATH=%s\n' "$PYTHONPATH" >&2
  unset PYTHONPATH
fi
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
export AMENT_PREFIX_PATH="$VENV"

exec "$VENV/bin/moog_demo" "$@"
