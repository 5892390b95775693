# make test       : create/reuse .venv, install the package with its test extras, run the test suite
# make bench      : create/reuse .venv, run the benchmark grid that fits this machine
# make test-py312 : the same suite in .venv312: Python 3.12 and the newest megatron-core 0.19.x
# make check-sdist: build the sdist, build bridge._C from it outside the tree, import it
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bridge-installed
# the install's full output, csrc's `ptxas -v` lines included (tests/test_csrc.py reads them)
BUILD_LOG := $(VENV)/bridge-build.log
# torch 2.14.1 is the CUDA build that lies on this machine's disk for Python 3.11 (PyPI serves it
# for 3.12); it lets setup.py compile csrc/.
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= $(shell for d in /usr/local/cuda /usr/local/cuda-*; do [ -x $$d/bin/nvcc ] && echo $$d && break; done)
export CUDA_HOME

# Second environment: megatron-core 0.17 and newer need Python >= 3.12. A pyenv shim named
# python3.12 may exist without answering, so take the first interpreter that runs.
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c '' 2>/dev/null && echo $$p && break; done)
VENV312   ?= .venv312
STAMP312  := $(VENV312)/.bridge-installed
MCORE312_SPEC ?= megatron-core>=0.19,<0.20

.PHONY: test bench venv venv312 test-py312 check-sdist lint clean

# $(1): interpreter, $(2): venv folder, $(3): extra requirements installed with the package
define install_venv
	@test -n "$(1)" || { echo "no interpreter for $(2) (set PYTHON/PYTHON312)"; exit 1; }
	test -x $(2)/bin/python || $(1) -m venv $(2)
	$(2)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(2)/bin/python -m pip install -q "$(TORCH_SPEC)" numpy
	$(2)/bin/python -m pip install -v --no-build-isolation -e '.[test,bench]' $(3) \
		> $(2)/bridge-build.log 2>&1 || { tail -n 80 $(2)/bridge-build.log; exit 1; }
	@grep -E "\[bridge setup\]|bytes spill stores" $(2)/bridge-build.log | sort | uniq -c || true
	touch $(2)/.bridge-installed
endef

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py bridge/_version.py $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
	$(call install_venv,$(PYTHON),$(VENV),)

test: $(STAMP)
	BRIDGE_BUILD_LOG=$(abspath $(BUILD_LOG)) $(PY) -m pytest -q -ra tests

venv312: $(STAMP312)

$(STAMP312): pyproject.toml setup.py bridge/_version.py $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
	$(call install_venv,$(PYTHON312),$(VENV312),"$(MCORE312_SPEC)")

test-py312: $(STAMP312)
	$(VENV312)/bin/python -c "import sys, megatron.core as m; print('Python', sys.version.split()[0], 'megatron-core', m.__version__)"
	BRIDGE_BUILD_LOG=$(abspath $(VENV312)/bridge-build.log) $(VENV312)/bin/python -m pytest -q -ra tests

# The wheel is built from the unpacked sdist in a temporary folder, so only what the sdist carries
# can reach the compiler; BRIDGE_BUILD_CUDA=1 fails the check if bridge._C is not built. One
# architecture is enough to prove the build (and halves nvcc's time).
check-sdist: $(STAMP)
	set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	BRIDGE_BUILD_CUDA=0 $(PY) -c "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])" "$$d" > /dev/null; \
	ls "$$d"/*.tar.gz; \
	BRIDGE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $(PY) -m pip wheel -q --no-deps --no-build-isolation \
		-w "$$d/wheel" "$$d"/*.tar.gz; \
	$(PY) -m zipfile -e "$$d"/wheel/*.whl "$$d/site"; \
	cd "$$d/site" && $(abspath $(PY)) -c "import torch, bridge, bridge._C, bridge.kernels; \
	assert all(m.__file__.startswith('$$d/site/') for m in (bridge, bridge._C, bridge.kernels)); \
	print('bridge', bridge.__version__, 'from the sdist:', bridge._C.__file__)"

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check bridge kernels benchmarks tests setup.py

clean:
	rm -rf build *.egg-info bridge/_C*.so
