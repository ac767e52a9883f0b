# dinat-m2f: the two commands a user needs are `make demo` and `make test`; both set everything up first.
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CI and this machine build the CUDA kernels for Hopper only (sm_90): it proves they compile, in minutes.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
NATIVE_SOURCES := $(shell find native -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup build test test-triton gpu-check speed-report lint demo clean

setup: $(VENV)/.stamp-ext

$(VENV)/.stamp-venv:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-venv requirements/pins.txt requirements/nodeps.txt
	$(PIP) install -q -r requirements/pins.txt
	$(PIP) install -q --no-deps -r requirements/nodeps.txt
	touch $@

$(VENV)/.stamp-d2: $(VENV)/.stamp-deps tools/install_detectron2.py
	$(PY) tools/install_detectron2.py
	touch $@

$(VENV)/.stamp-ext: $(VENV)/.stamp-d2 setup.py $(NATIVE_SOURCES)
	mkdir -p build
	flock build/.lock $(PIP) install -q -e . --no-build-isolation --no-deps
	$(PY) -c "import dinat_m2f; print('dinat_m2f build:', dinat_m2f.build_info())"
	touch $@

# Rebuild the extension (incremental: ninja keeps its objects in build/temp).
build:
	rm -f $(VENV)/.stamp-ext
	$(MAKE) setup

lint: $(VENV)/.stamp-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(NATIVE_SOURCES)

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)
	# The NA kernels once more on the AVX2 baseline path: the run above took AVX-512 where the CPU has it.
	DINAT_M2F_CPU_ISA=avx2 $(PY) -m pytest -q tests/test_na_ops.py tests/test_na_layouts.py tests/test_na_reference.py tests/test_cpu_isa.py
	$(MAKE) test-triton

# The Triton kernels on the CPU: TRITON_INTERPRET must be set before triton is imported, hence a process of its own.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_na_triton.py $(PYTEST_ARGS)

# On a bare GPU machine (its own python3 and torch, no venv): build for the GPU there, GPU tests, compute-sanitizer,
# benchmarks, Mask2Former step; report.json + report.md in GPU_CHECK_OUT. See README "GPU check".
GPU_CHECK_PYTHON ?= python3
GPU_CHECK_OUT ?= build/gpu-check
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Issue #11's CPU speed targets, one table (build/speed-report/report.md): the benchmarks run one after another, so
# run nothing else meanwhile. The first run builds worktrees of commit 09463ec (one per path) to compare Mask2Former
# against.
# SPEED_REPORT_ARGS="--paths native,avx2 --all-precisions" adds the AVX2 code paths and bf16 / AMP rows.
SPEED_REPORT_ARGS ?=
speed-report: setup
	$(PY) tools/speed_report.py --make-baseline $(SPEED_REPORT_ARGS)

demo: setup
	$(PY) demo/run_demo.py

clean:
	rm -rf build dinat_m2f/_C*.so
