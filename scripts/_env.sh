# Shared set-up for scripts/run and scripts/test: a virtualenv with the project in it.
# Sourced, not run. Creates .venv on first use and reinstalls when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "quorum: Python 3.11 or newer is needed (found: $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "quorum: creating .venv" >&2
    "$PY" -m venv .venv
fi
_extras="${QUORUM_EXTRAS:-}"
_stamp=".venv/.quorum-installed${_extras:+-$_extras}"
if [ ! -f "$_stamp" ] || [ pyproject.toml -nt "$_stamp" ]; then
    echo "quorum: installing the project into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${_extras:+[$_extras]}"
    touch "$_stamp"
fi
