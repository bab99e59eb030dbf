# make demo: set up (venv, CPU torch, esta) and run the demo. make test: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-quick llm clean
setup:
	ESTA_VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/esta demo --overwrite

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/esta bench

bench-quick: setup
	$(VENV)/bin/esta bench --quick

llm: setup
	$(VENV)/bin/esta lm-train

clean:
	rm -rf runs .pytest_cache
