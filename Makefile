# `make demo` distils scikit-learn's digits on the CPU; `make test` runs the test suite.
# Both create or update the virtual environment .venv in the repository first.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip on this platform takes these torch/torchvision builds from the local disk (see README).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: venv
	$(PY) -m lgd_ray.distill digits

test: venv
	$(PY) -m pytest -q
