# The README's two commands. Each creates .venv when missing and installs what it needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pinned versions the test suite last passed with (every dependency but torch); `make lock`
# refreshes it from the current venv.
CONSTRAINTS := constraints.txt
# CPU wheel of torch unless a GPU is visible (nvidia-smi answers).
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch"; else echo "torch==2.13.0"; fi)

.PHONY: demo test lint venv lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/noisyseg demo

# Style and layering first (seconds), then the tests.
lint: $(STAMP)
	$(BIN)/ruff check noisyseg tests benchmarks docs
	$(BIN)/ruff format --check noisyseg tests benchmarks docs
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest tests

# Re-pin every installed distribution except torch (and its CUDA wheels) and the project itself.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable \
	  | grep -v -i -E '^(torch|nvidia-|triton|noisyseg)([=@ ]|$$)' > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
