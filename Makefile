# Two commands do all set-up on a fresh machine:
#   make demo   installs sdfast into .venv and runs the main job
#   make test   installs the test extras and runs the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sdfast-installed
TSTAMP := $(VENV)/.sdfast-test-installed
# torch first, pinned: the CPU wheel lies on this machine's disk (pip.conf find-links).
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-fast clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh csrc/*/CMakeLists.txt)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) setuptools wheel pybind11
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	touch $@

$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
	touch $@

install: $(STAMP)
install-test: $(TSTAMP)

demo: $(STAMP)
	$(BIN)/python -m sdfast.demo

test: $(TSTAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(TSTAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info sdfast/_C*.so
