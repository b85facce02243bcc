#!/usr/bin/env bash
# Create .venv beside the project and install the project into it (editable, with dev extras).
# Sourced by scripts/demo and scripts/test; re-running is cheap when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "restic-manager needs Python 3.11 or newer")'
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${1:-base}"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [ "${1:-base}" = dev ]; then
        "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    else
        "$VENV/bin/python" -m pip install -q -e "$ROOT"
    fi
    touch "$stamp"
fi
