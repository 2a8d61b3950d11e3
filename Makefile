# `make demo` and `make test` each run the idempotent set-up first.
PY := .venv/bin/python

.PHONY: setup vllm-env demo test test-all clean

setup:
	bash scripts/setup.sh

# The vLLM rollout engine's own environment (.venv-vllm); only `rollout.engine: vllm` and the
# slow vLLM tests need it.
vllm-env:
	bash scripts/vllm_env.sh

demo: setup
	$(PY) -m posttrain.demo

test: setup
	$(PY) -m pytest -q -m "not slow" --timeout=900

test-all: setup vllm-env
	$(PY) -m pytest -q --timeout=1800

clean:
	rm -rf .venv .venv-vllm runs
