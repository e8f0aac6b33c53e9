# Two entry points for a fresh machine with only Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Constraints apply to build environments too (deepspeed builds from source against torch).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# DeepSpeed compiles a CPU op on first use; keep that build with this environment's torch.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install browser test demo serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<25" "setuptools<76" wheel
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,serve,vis]'
	touch $@

# The web demo's browser test drives Debian's Chromium: installed here when missing and possible (root, or
# sudo without a password); otherwise that test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "No Chromium and no apt-get: the browser test will be skipped."; \
	else \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
		else echo "No Chromium, and installing it needs root: the browser test will be skipped."; exit 0; fi; \
		echo "Installing Chromium (Debian package) for the browser test"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
			--no-install-recommends chromium >/dev/null \
			|| echo "Installing chromium failed: the browser test will be skipped."; \
	fi

test: install browser
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m moellava.demo

# The web demo on the `make demo` checkpoint (built first when missing); SERVE_ARGS="--port 8000" etc.
SERVE_ARGS ?=
serve: install demo_output/stage3/config.json
	$(PY) -m moellava.serve.gradio_web_server --model-path demo_output/stage3 $(SERVE_ARGS)

demo_output/stage3/config.json:
	$(MAKE) demo

clean:
	rm -rf $(VENV) demo_output
