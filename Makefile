# Two entry points (README): `make sample PROMPT="..."` and `make test`. Each creates .venv and installs on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PROMPT ?= an upbeat chiptune melody in A minor with drums, 140 bpm
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist processes (whole files per worker): most tests are bound by single-threaded XLA compilation.
TEST_WORKERS ?= 2

.PHONY: install sample test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

sample: $(VENV)/.installed
	$(PY) sample.py --prompt "$(PROMPT)" $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/bench_codec.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
