# Two entry points (README): `make sample PROMPT="..."` and `make test`. Each creates .venv and installs on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PROMPT ?= an upbeat chiptune melody in A minor with drums, 140 bpm
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist processes (whole files per worker): most tests are bound by single-threaded XLA compilation.
TEST_WORKERS ?= 2
# libtpu for compiling TPU programs on this machine (`--compile-only`, tests/test_aot.py): the version jax[tpu] pins
# for our jax, installed beside the venv (a libtpu inside it makes every JAX process probe for TPUs at start-up).
LIBTPU ?= libtpu==0.0.42.*
LIBTPU_DIR ?= .libtpu

.PHONY: install sample test bench clean tpu-tools app browser-tools

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,app]'
	touch $@

# The browser tests' system packages (Chromium for Playwright, ffmpeg for Gradio's audio stream). Not fatal: where
# apt is unavailable, tests/test_app.py skips and says which is missing.
browser-tools:
	@(command -v chromium && command -v ffmpeg) >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq chromium ffmpeg) \
		|| echo "warning: could not install chromium/ffmpeg; the browser tests will be skipped"

install: $(VENV)/.installed

# Not fatal: where libtpu cannot install, tests/test_aot.py skips and says why.
$(LIBTPU_DIR)/.installed:
	$(PY) -m pip install -q --no-deps --target $(LIBTPU_DIR) "$(LIBTPU)" && touch $@ \
		|| echo "warning: could not install $(LIBTPU) into $(LIBTPU_DIR); TPU compile checks will be skipped"

tpu-tools: $(VENV)/.installed $(LIBTPU_DIR)/.installed

sample: $(VENV)/.installed
	$(PY) sample.py --prompt "$(PROMPT)" --overwrite $(ARGS)

app: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed tpu-tools browser-tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/bench_codec.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_stream.py

clean:
	rm -rf $(VENV) .pytest_cache $(LIBTPU_DIR)
