#!/usr/bin/env bash
# ./start.sh [--simulate] [serve options]   run the daemon (embedded PostgreSQL by default)
# ./start.sh test [pytest args]             install test dependencies, run ruff, mypy, pytest
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local extra=$1 stamp="$VENV/.installed-$1"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e ".[${extra}]"
        touch "$stamp"
    fi
}

ensure_chromium() {
    if ! command -v chromium >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser tests" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    fi
}

if [ "${1:-}" = "test" ]; then
    shift
    ensure_venv test
    ensure_chromium
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" --strict tower_progress
    "$VENV/bin/mypy" --strict comfyui_bridge
    exec "$VENV/bin/pytest" --cov=tower_progress --cov-report=term "$@"
fi

ensure_venv run
exec "$VENV/bin/tower-progress" serve "$@"
