# `make demo` distils scikit-learn's digits on the CPU; `make test` runs the test suite (`make test-fast`: all but
# the slow tests); `make bench` runs the
# nine benchmarks of BENCHMARKS.md one after the other and writes their output to bench/results.txt.
# Each creates or updates the virtual environment .venv in the repository first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pins (clusters/Dockerfile pins the same; a test checks), and the build for this machine: the CUDA wheels
# whose CUDA the NVIDIA driver runs (lgd_ray/torch_build.py reads nvidia-smi), else pip's default index (here: the
# local disk, see README). TORCH_INDEX=URL overrides, e.g. https://download.pytorch.org/whl/cpu for a CPU-only build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?= $(shell python3 lgd_ray/torch_build.py)

.PHONY: demo test test-fast bench venv gpu-check
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: venv
	$(PY) -m lgd_ray.distill digits

test: venv
	$(PY) -m pytest -q --durations=15  # the slowest tests listed: where the suite's time goes

test-fast: venv  # the daily loop: everything but the tests marked slow (clusters, Ray Train, prior fits, jobs)
	$(PY) -m pytest -q -m "not slow"

BENCHES := sampler_vs_pipeline batched_guidance guided_cost actors train_loader cost_model data_path cluster train_fixed_cost
bench: venv
	rm -f bench/results.txt
	set -o pipefail; for b in $(BENCHES); do $(PY) bench/$$b.py 2>&1 | tee -a bench/results.txt || exit 1; done

# What only a GPU can show (bench/gpu_check.py): at most ~10 minutes on one GPU, nothing downloaded. Uses .venv if
# there is one, else the machine's python3 (a bare GPU machine with torch: it names any package it lacks).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py --out bench/results-gpu.json
