# The two commands a newcomer needs:
#   make demo   set everything up and run the exporter against the built-in simulators
#   make test   set everything up (Python packages and the Debian tools the tests use) and run
#               every test, lint included
# and, while working on the code:
#   make check  the quick loop, well under a minute, needing only `make setup` (no Debian tools):
#               lint, then the tests that start no child process and take under a second each,
#               pytest -m "not processes and not slow". An exporter in a thread and loopback
#               servers in this process count as quick; `python -m exporter`, simulator processes,
#               Prometheus, promtool, Alertmanager, PostgreSQL, Chromium and docker do not. Such
#               tests are marked `processes` (tests/conftest.py fails one that starts a process
#               unmarked), tests of a second or more `slow` (see the 5 slowest it prints).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LISTEN ?= :10467

.PHONY: demo test check setup tools lint bench clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/whatsapp-exporter --demo --web.listen-address=$(LISTEN)

tools: setup
	scripts/install-test-tools $(BIN)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: tools lint
	$(BIN)/pytest

check: lint
	$(BIN)/pytest -q --durations=5 -m "not processes and not slow"

# every benchmark runs, even after one missed a target; the exit code says whether any did
bench: setup
	@failed=""; for script in bench/*.py; do echo "== $$script"; \
	  $(BIN)/python $$script || failed="$$failed $$script"; done; \
	  if [ -n "$$failed" ]; then echo "missed a target:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
