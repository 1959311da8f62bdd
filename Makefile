# Two commands set up everything on a fresh machine:
#   make demo   create .venv, install, run the main job on a tiny model (CPU)
#   make test   create .venv, install, run the tests
# torch comes from TORCH (default: the CPU build below); a torch already in .venv is kept.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The suite runs its test files on every core (pytest-xdist); PYTEST_ARGS=-n0 runs it in one process.
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/wan-build demo

bench: $(STAMP)
	$(BIN)/python bench/cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
