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
if [ ! -f "$_stamp" ] || [ pyproject.toml -nt "$_stamp" ] || [ constraints.txt -nt "$_stamp" ]; then
    echo "quorum: installing the project into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${_extras:+[$_extras]}"
    touch "$_stamp"
fi

# ensure_tools TOOL:PACKAGE...: install the Debian packages of missing tools (as root),
# or say which are missing. The embedded engine is built with cmake and g++.
ensure_tools() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "quorum: installing ${missing[*]} with apt-get" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "quorum: please install ${missing[*]} (the embedded llama.cpp engine builds with cmake and g++; the LAN tests use ip, the dashboard's browser test chromium)" >&2
    fi
}
