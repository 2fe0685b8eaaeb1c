# privfast's set-up and checks. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch 2.13.0; pip takes a local file for it here. An unpinned `torch` would pull
# several GB of CUDA packages, so torch is installed first and the build reuses it.
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
# Wheels carried to a machine without internet (make wheels; git-ignored).
WHEELS ?= .whl
OUT ?= build/gpu-check

.PHONY: install demo selfcheck test bench cuda-check cuda-glue-check wheels gpu-check clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja pybind11
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	$(PYTHON) -c "import privfast; assert privfast.has_extension(), 'privfast._C did not build'; print('privfast installed with compiled kernels')"

# The main job: non-private vs DP-SGD vs DP-Mix on the bundled digits, audited (privfast demo).
demo: install
	$(PYTHON) -m privfast.cli demo

# Every op against its reference on CPU (and CUDA when present), with timings.
selfcheck: install
	$(PYTHON) -m privfast.selfcheck

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only -q

# Compiles every CUDA device-code header with nvcc for sm_80 and sm_90, as C++17 and as C++20 (the
# standard torch 2.13 and 2.14 build extensions with); no GPU or CUDA torch needed.
cuda-check:
	for std in 17 20; do for arch in 80 90; do \
	  $(NVCC) -std=c++$$std -O3 -arch=sm_$$arch -c tools/cuda_device_code.cu -o /tmp/privfast_cuda_sm$$arch.o || exit 1; \
	done; done
	@echo "CUDA device code compiles for sm_80 and sm_90 as C++17 and C++20"

# Compiles the CUDA glue (csrc/cuda/*.cu) against the installed torch's headers, even a CPU torch's,
# with the C++ standard the build takes from that torch (tools/torch_build.py).
cuda-glue-check: install
	PYTHON=$(PYTHON) NVCC=$(NVCC) tools/check_cuda_glue.sh

# Opacus's wheel (the version installed here), for `make gpu-check` on a machine without internet.
wheels:
	$(PIP) download -q --no-deps -d $(WHEELS) "opacus==$$($(PYTHON) -c 'import opacus; print(opacus.__version__)')"
	@ls $(WHEELS)

# The one command for a GPU machine: installs the carried wheels and privfast (CUDA, sm_90), then
# tests, compute-sanitizer, CPU-vs-CUDA noise, bandwidth, training steps and attacks; logs, a JSON
# and a Markdown table under OUT (see tools/gpu_check.py). Run `make wheels` first where pip works.
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT) --wheels $(WHEELS)

clean:
	rm -rf build *.egg-info privfast/_C*.so
