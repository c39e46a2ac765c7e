# Shared set-up for the scripts: a Python 3.11 virtual environment in .venv with
# the pinned requirements installed (re-installed only when a requirements file changes).
# Source it, then call: stepvideo_venv requirements.txt [more files...]
stepvideo_venv() {
  local py="${PYTHON:-python3.11}"
  command -v "$py" >/dev/null 2>&1 || py=python3
  if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: Python 3.11 is required (found $("$py" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    return 1
  fi
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
  local stamp=".venv/.installed-$(cat "$@" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== installing Python packages ($*)"
    python -m pip install --quiet --upgrade pip
    local args=()
    for f in "$@"; do args+=(-r "$f"); done
    python -m pip install --quiet "${args[@]}"
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
  export GLOG_v="${GLOG_v:-3}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
