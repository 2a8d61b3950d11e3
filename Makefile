# `make demo` and `make test` each run the idempotent set-up first.
PY := .venv/bin/python

.PHONY: setup demo test test-all clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m posttrain.demo

test: setup
	$(PY) -m pytest -q -m "not slow" --timeout=900

test-all: setup
	$(PY) -m pytest -q --timeout=1800

clean:
	rm -rf .venv runs
