# chatsite: the interface is `make run`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev run migrate test test-postgres lint format bench clean

# Reinstalls only when a requirements file changed (the stamp is newer otherwise).
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

migrate: install
	$(PY) manage.py migrate --noinput

# One machine: SQLite, the embedded model, daphne on http://$(HOST):$(PORT).
run: migrate
	$(PY) manage.py chat_sweep --all
	$(VENV)/bin/daphne -e tcp:port=$(PORT):interface=$(HOST):backlog=2048 chatsite.asgi:application

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Streaming benchmark; the report goes to docs/performance.md. BENCH_ARGS=--quick for a short run.
bench: install-dev
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) benchmarks/run.py --command "make bench $(BENCH_ARGS)" $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles
