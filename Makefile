# LMI: `make run` serves the console with its workers; `make test` runs the whole suite.
# Both set everything up first (virtualenv, dependencies, database, demo appliance).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup install browser lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

setup: install
	$(BIN)/python -m lmi.launcher setup

run: install
	$(BIN)/python -m lmi.launcher run

browser:
	@scripts/ensure-chromium

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python manage.py check
	$(BIN)/python manage.py makemigrations --check --dry-run

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/events_log.py
	$(BIN)/python bench/msgstore_fill.py
	$(BIN)/python bench/graphs.py
	$(BIN)/python bench/smtp_accept.py
	$(BIN)/python bench/purge.py
	$(BIN)/python bench/download.py
	$(BIN)/python bench/upgrade.py --messages 50000

clean:
	rm -rf $(VENV) var .pytest_cache
