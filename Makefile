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

.PHONY: run test install bubblewrap lint format clean

run: $(STAMP) bubblewrap
	$(PY) -m aiagentserver.launcher run

test: $(STAMP) bubblewrap
	$(PY) -m aiagentserver.launcher test -- $(PYTEST_ARGS)

install: $(STAMP) bubblewrap

# bubblewrap runs generated code in a sandbox (agents/sandbox.py). Installed when we are root
# with apt-get; otherwise a warning, and the rest goes on. Silent when it is there.
BWRAP_MISSING := bubblewrap is not installed: QA test runs will fail unless SANDBOX_ALLOW_UNSANDBOXED=1; \
	install it with: sudo apt-get install bubblewrap

bubblewrap:
	@if ! command -v "$${SANDBOX_BWRAP:-bwrap}" >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "==> Installing bubblewrap, the sandbox for generated code."; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
				|| { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
				|| echo "==> $(BWRAP_MISSING)"; \
		else \
			echo "==> $(BWRAP_MISSING)"; \
		fi; \
	fi

# A venv that could not be made whole is removed, so that the next make makes it again.
$(PY):
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"==> Python 3.11 or later is needed, and $(PYTHON) is {v.major}.{v.minor}: run make with PYTHON=python3.11 (or later)")'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "==> $(PYTHON) -m venv failed (on Debian or Ubuntu: apt-get install python3-venv)"; exit 1; }

$(STAMP): requirements.txt | $(PY)
	@echo "==> Installing requirements.txt into $(VENV)."
	@echo "==> The first time on a machine, llama-cpp-python compiles from source (several minutes); pip keeps the wheel for later installs."
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
