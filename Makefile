# Infusion Bridge. `make run` serves the demo clinic; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench migrate demo clean

# Recreate the environment when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/infusion-bridge migrate
	$(BIN)/infusion-bridge demo --if-empty
	$(BIN)/infusion-bridge serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict service mappings

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench

migrate demo: $(STAMP)
	$(BIN)/infusion-bridge $@

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
