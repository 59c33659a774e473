# LMI: `make run` serves the console with its workers; `make test` runs the whole suite.
# Both set everything up first (virtualenv, dependencies, database, demo appliance).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup install browser lint format bench bench-smoke clean

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

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each with its own test database,
# Redis, ports and var/ folders: one more than the cores, since many tests spend their time
# waiting on a worker, a browser or a killed process (2 cores: 218 s with 3, 267 s with 2).
# PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
test: install browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python manage.py check
	$(BIN)/python manage.py makemigrations --check --dry-run

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Full sizes (docs/performance.md); each bench ends with one JSON line of its figures.
bench: install
	$(BIN)/python bench/events_log.py --json
	$(BIN)/python bench/msgstore_fill.py --json
	$(BIN)/python bench/graphs.py --json
	$(BIN)/python bench/smtp_accept.py --json
	$(BIN)/python bench/purge.py --json
	$(BIN)/python bench/download.py --json
	$(BIN)/python bench/upgrade.py --messages 50000 --json
	$(BIN)/python bench/upgrade_msgstore.py --json

# Every bench at a tiny size (about a minute in all), so none can rot unnoticed: fails when one
# fails, or prints no JSON line naming it, or a script in bench/ has no line here. The longest
# first, as they run BENCH_JOBS at once.
BENCH_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
bench-smoke: install
	$(BIN)/python scripts/bench_smoke.py --jobs $(BENCH_JOBS) \
		"bench/upgrade.py --messages 300 --baseline-seconds 2 --json" \
		"bench/events_log.py --rows 3000 --repeat 3 --exports 1 --json" \
		"bench/msgstore_fill.py 3000 --json" \
		"bench/graphs.py --repeat 3 --json" \
		"bench/smtp_accept.py --messages 200 --json" \
		"bench/purge.py --messages 3000 --probe-seconds 1 --json" \
		"bench/download.py --size-mb 16 --repeat 1 --json" \
		"bench/upgrade_msgstore.py 3000 --late 200 --json"

clean:
	rm -rf $(VENV) var .pytest_cache
