# spasem developer commands. `make demo` and `make test` are the two set-up commands of the README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only torch by default; GPU users: install a CUDA torch into the venv first, then `make ... CONSTRAINTS=`
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT) -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## run the main job on generated sample data (offline): prediction, priors, figure, Dice
demo: install
	$(BIN)/spasem demo --out $(DEMO_OUT)

## the whole test suite
test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
