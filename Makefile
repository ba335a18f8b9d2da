# Two entry points (see README): `make demo` runs the main job, `make test` runs the checks.
# Both create .venv on first use; nothing else needs installing beyond Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Flower must never phone home here (no network) and keeps its state inside the checkout.
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed  ## federated simulation on the embedded data, writes runs/demo/report.md
	$(BIN)/genseg-fed simulate --config configs/default.yaml --out runs/demo

test: $(BIN)/.installed  ## lint, format check and the whole test suite (slow end-to-end tests included)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .flwr .pytest_cache .ruff_cache
