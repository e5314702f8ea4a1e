# Infusion Bridge. `make run` serves the demo clinic; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

EXAMPLES := .cache/hl7.fhir.r4.examples-4.0.1

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
	$(BIN)/infusion-bridge clients demo
	$(BIN)/infusion-bridge serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict service mappings

# The official R4 definitions and examples (npm package), for the conformance tests.
$(EXAMPLES)/package/package.json:
	mkdir -p $(EXAMPLES)
	cd .cache && npm pack --silent hl7.fhir.r4.examples@4.0.1 >/dev/null
	tar xzf .cache/hl7.fhir.r4.examples-4.0.1.tgz -C $(EXAMPLES)
	rm .cache/hl7.fhir.r4.examples-4.0.1.tgz

test: lint typecheck $(EXAMPLES)/package/package.json
	FHIR_R4_EXAMPLES=$(EXAMPLES)/package $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench

migrate demo: $(STAMP)
	$(BIN)/infusion-bridge $@

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
