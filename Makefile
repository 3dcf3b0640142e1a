# Two commands do everything: `make demo` and `make test`. Both create .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU wheel of torch (on disk on these machines). On a CUDA machine run instead:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/sd-lora demo

# Two worker processes (pytest-xdist), one test file each at a time (module fixtures stay in one
# process): most tests run on one torch thread or wait on a subprocess, so 2 cores finish in ~half
# the time. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Benchmarks print ratios against the reference tool; minutes each, not tests (see bench/README.md).
bench: setup
	PYTHONPATH=. $(PY) bench/bench_stack.py
	PYTHONPATH=. $(PY) bench/bench_train.py --steps 5
	PYTHONPATH=. $(PY) bench/bench_tools.py
	PYTHONPATH=. $(PY) bench/bench_base_precision.py
	PYTHONPATH=. $(PY) bench/bench_train_gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
