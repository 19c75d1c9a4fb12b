# The two commands of the README: `make run` and `make test`. Both create .venv when missing.
# PYTHON defaults to `newest`: the newest Python >= 3.12 that runs (jax >= 0.11 needs 3.12; jax 0.12 brings bf16
# matmuls on CPUs with AMX/AVX-512 BF16): python3.N on PATH, then pyenv's installed versions; else python3.
# `PYTHON=python3.11` (or any interpreter) overrides it. Run `make clean` first when switching interpreters.
PYTHON ?= newest
ifeq ($(PYTHON),newest)
override PYTHON := $(shell for v in 20 19 18 17 16 15 14 13 12; do \
            for p in python3.$$v $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.$$v.*/bin/python3.$$v 2>/dev/null \
                                   | sort -r -V); do \
              $$p -c "" >/dev/null 2>&1 && { echo $$p; exit 0; }; \
            done; \
          done; echo python3)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test install clean python

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the packaging changes.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/maxlm demo

# One test worker per core, at most 4 (pytest-xdist, in `.[test]`); tests/conftest.py orders the heavy files first.
test: $(STAMP)
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist worksteal

clean:
	rm -rf $(VENV) runs build *.egg-info

python:
	@echo $(PYTHON)
