# The two commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
ROM    ?= cartridge/pokedreamer.gb
OUT    ?= outputs/demo

.PHONY: setup test demo cartridge sdcc clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# SDCC (sm83 port) rebuilds the cartridge; Debian's package, installed when missing.
sdcc:
	@command -v sdcc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq sdcc >/dev/null; }

cartridge: sdcc
	$(MAKE) -C cartridge

test: setup sdcc
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
