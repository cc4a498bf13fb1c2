# Two commands set everything up from nothing: `make demo` and `make test`.
# Both create .venv when it is missing and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXT_STAMP := build/.extensions-built
EXT_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
# torch is installed (pinned, CPU build) only when the venv cannot import one,
# so a user's own CUDA build of torch is never replaced.
TORCH_PIN ?= torch==2.13.0
NVCC ?= nvcc
NVCC_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: venv build test test-fast lint format demo bench bench-norm bench-data bench-model bench-growth bench-growth-searched bench-growth-branch nvcc-check clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11 ninja
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	# No build isolation: the extensions compile against the torch in this venv,
	# and an isolated build env would download a second (CUDA) torch.
	$(PIP) install -q --no-build-isolation -e '.[dev,bench,interop,export]'
	@touch $(STAMP)
	# The editable install has just built the extensions in place.
	@mkdir -p build && touch $(EXT_STAMP)

venv: $(STAMP)

# Rebuilds the C++ extensions in place when their sources changed.
$(EXT_STAMP): $(STAMP) $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $(EXT_STAMP)

build: $(EXT_STAMP)

# A CUDA compile error must fail CI even where no GPU exists.
nvcc-check:
	@if command -v $(NVCC) >/dev/null 2>&1 && [ -f csrc/masked_norm/cuda.cu ]; then \
		echo "nvcc: compiling csrc/masked_norm/cuda.cu for sm_80, sm_90"; \
		mkdir -p build/nvcc && \
		$(NVCC) -std=c++17 -O3 $(NVCC_ARCHS) -Icsrc/masked_norm -c csrc/masked_norm/cuda.cu \
			-o build/nvcc/masked_norm_cuda.o || exit 1; \
	else echo "nvcc-check: nvcc or csrc/masked_norm/cuda.cu not present, skipped"; fi

test: build nvcc-check
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo: build
	$(PY) -m megatron_msg.cli demo

bench-norm: build
	$(PY) benchmarks/masked_norm.py

bench-data: build
	$(PY) benchmarks/data_pipeline.py

bench-model: build
	$(PY) benchmarks/model_throughput.py

# Issue 7: MSG vs from scratch vs No Mask, 3 seeds (full size: long; see the script).
bench-growth: build
	$(PY) benchmarks/growth_speedup.py

# The same with the growth schedule chosen by `megatron-msg schedule-search` (its probes
# first, then the MSG and No Mask arms; scratch runs are reused from bench-growth).
bench-growth-searched: build
	$(PY) benchmarks/growth_speedup.py --search --out demo_out/growth_speedup_searched \
		--reuse-scratch demo_out/growth_speedup --plot benchmarks/growth_speedup_searched.png

# The same with `schedule-search --method branch` (grows the real model at branch points).
bench-growth-branch: build
	$(PY) benchmarks/growth_speedup.py --search --search-method branch \
		--out demo_out/growth_speedup_branch --reuse-scratch demo_out/growth_speedup \
		--plot benchmarks/growth_speedup_branch.png

bench: bench-norm bench-data bench-model

clean:
	rm -rf build *.egg-info megatron_msg/*.so
