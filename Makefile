# `make serve` and `make test` bootstrap .venv themselves (Python 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench verify-cache clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,hf]'
	touch $@ $(VENV)/.installed

# Until the HTTP server lands, `serve` demonstrates generation on the shipped weights (or, while
# none are shipped, on random weights of the seed preset) and says so.
serve: $(VENV)/.installed
	@if [ -d weights/toyllm-base ]; then \
	  echo "toyllm: the HTTP server is not built yet; streaming a demo generation from weights/toyllm-base"; \
	  $(BIN)/toyllm generate --prompt "The history of the city" --max-new-tokens 64 --stats; \
	else \
	  echo "toyllm: the HTTP server and trained weights are not built yet; demo generation with RANDOM seed-preset weights"; \
	  $(BIN)/toyllm generate --preset seed --prompt "The history of the city" --max-new-tokens 64 --stats; \
	fi

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check toyllm_core server tests benchmarks

bench: $(VENV)/.installed
	$(BIN)/toyllm bench --preset seed --lengths 256,1024 --policies full,snapkv --batches 1,16 --json out/bench-decode.json

verify-cache: $(VENV)/.installed
	$(BIN)/toyllm verify-cache --length 1024

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
