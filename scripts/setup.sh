#!/usr/bin/env bash
# Set up esta in a virtual environment (default .venv; ESTA_VENV overrides). Idempotent: a second run is quick.
# Installs the CPU build of torch first, so that nothing pulls a multi-GB CUDA build, then esta and its pinned
# dependencies; as root on Debian it also installs the Fashion-MNIST package (the mini family's source set) and
# Chromium (to check report.html headless).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ESTA_VENV:-.venv}"
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # A local CPU wheel (pip's find-links) if there is one; else PyTorch's CPU index.
  links="${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}"
  if ls $links/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    pip_install "torch==$TORCH_VERSION"
  else
    pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

if [ ! -f "$VENV/.esta-installed" ] || [ pyproject.toml -nt "$VENV/.esta-installed" ] \
   || [ constraints.txt -nt "$VENV/.esta-installed" ]; then
  pip_install -c constraints.txt -e ".[dev,llm,onnx,serve]"
  touch "$VENV/.esta-installed"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
   || echo "setup: could not install dataset-fashion-mnist (only 'esta pretrain' needs it)" >&2
fi
# headless Chromium checks report.html (a test and scripts/check_report.py); a browser for people, not for esta
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
   || echo "setup: could not install chromium (only the report.html browser check needs it)" >&2
fi
echo "setup: esta ready in $VENV ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
