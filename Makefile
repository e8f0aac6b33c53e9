# Two entry points for a fresh machine with only Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Constraints apply to build environments too (deepspeed builds from source against torch).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# DeepSpeed compiles a CPU op on first use; keep that build with this environment's torch.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<25" "setuptools<76" wheel
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,vis]'
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m moellava.demo

clean:
	rm -rf $(VENV) demo_output
