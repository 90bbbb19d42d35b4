# make run  — set up everything that is missing and run the server (web, worker, Flower).
# make test — the same set-up, then the whole test suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

# Development defaults; a deployment sets its own (see doc/operations.md).
export DEBUG ?= 1
# The native build of llama.cpp crashes on CPUs that report AMX.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: run test install lint format clean

run: $(STAMP)
	$(PY) -m aiagentserver.launcher run

test: $(STAMP)
	$(PY) -m aiagentserver.launcher test -- $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	@echo "==> Installing requirements.txt into $(VENV)."
	@echo "==> The first time, llama-cpp-python compiles from source: this takes several minutes."
	$(PY) -m pip install --disable-pip-version-check --no-deps -r requirements.txt
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) var
