# chatsite: the interface is `make run`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev run migrate test test-postgres lint format bench clean

# llama-cpp-python compiles from source. Its default, -march=native, is not safe:
# a wheel built on one CPU dies with SIGILL on another (pip's cache reuses it), and
# a VM may advertise AMX tiles that it then refuses, so even a build on the same
# machine crashed here. Build for x86-64-v3 (AVX2, FMA; every x86 server since
# about 2015), never from or into pip's wheel cache; the stamp carries the version
# and the flags, so a change of either rebuilds it once.
LLAMA_REQUIREMENT := $(shell grep -i '^llama-cpp-python==' requirements.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_STAMP := $(VENV)/.llama-$(shell echo '$(LLAMA_REQUIREMENT) $(LLAMA_CMAKE_ARGS)' | cksum | cut -d' ' -f1)

$(LLAMA_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet --no-cache-dir \
		--force-reinstall --no-deps "$(LLAMA_REQUIREMENT)"
	touch $@

# Reinstalls only when a requirements file changed (the stamp is newer otherwise).
$(VENV)/.installed: requirements.txt $(LLAMA_STAMP)
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
	$(PY) -m chatsite.serve -e tcp:port=$(PORT):interface=$(HOST):backlog=2048 chatsite.asgi:application

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Streaming benchmark (docs/performance.md; BENCH_ARGS=--quick for a short run), then the
# embedded model's speed (docs/performance-local-model.md).
bench: install-dev
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) benchmarks/run.py --command "make bench $(BENCH_ARGS)" $(BENCH_ARGS)
	$(PY) benchmarks/local_model.py

clean:
	rm -rf $(VENV) staticfiles
