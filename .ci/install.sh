#!/usr/bin/env bash
# Installs dawn and everything its tests need on a fresh CPU machine (Python 3.11, Linux x86_64).
# torch: the CPU build 2.13.0 (this machine kind's pip finds it locally; elsewhere see README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v espeak-ng >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
    || echo "warning: could not install espeak-ng (speech synthesis for the synthetic corpus)"
fi
if ! command -v c++ >/dev/null 2>&1; then  # builds dawn's native CPU kernels (dawn/models/native.py)
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
    || echo "warning: could not install g++ (dawn's native CPU kernels will fall back to PyTorch's formulations)"
fi
if ! command -v chromium >/dev/null 2>&1; then  # the web page's browser test (tests/integration/test_web_page.py)
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium (the web page's browser test will fail)"
fi
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -r requirements-nodeps.txt
python -m pip install -q --no-deps -e .
