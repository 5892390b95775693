# make test  : create/reuse .venv, install the package with its test extras, run the test suite
# make bench : create/reuse .venv, run the benchmark grid that fits this machine
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bridge-installed
# the install's full output, csrc's `ptxas -v` lines included (tests/test_csrc.py reads them)
BUILD_LOG := $(VENV)/bridge-build.log
# torch 2.14.1 is the CUDA build that lies on this machine's disk; it lets setup.py compile csrc/.
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= $(shell for d in /usr/local/cuda /usr/local/cuda-*; do [ -x $$d/bin/nvcc ] && echo $$d && break; done)
export CUDA_HOME

.PHONY: test bench venv lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy
	$(PY) -m pip install -v --no-build-isolation -e '.[test,bench]' > $(BUILD_LOG) 2>&1 \
		|| { tail -n 80 $(BUILD_LOG); exit 1; }
	@grep -E "\[bridge setup\]|bytes spill stores" $(BUILD_LOG) | sort | uniq -c || true
	touch $(STAMP)

test: $(STAMP)
	BRIDGE_BUILD_LOG=$(abspath $(BUILD_LOG)) $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check bridge kernels benchmarks tests setup.py

clean:
	rm -rf build *.egg-info bridge/_C*.so
