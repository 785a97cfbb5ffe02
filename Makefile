# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv systemd-tools demo test test-gpu bench clean

# A host that already has torch (a GPU host with its CUDA build) keeps it: the venv then sees the
# system packages. Elsewhere the CPU build is installed, never an unpinned (CUDA) torch.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	PYTHONPATH=. $(PY) examples/demo.py

# tests/service verifies the systemd unit with systemd-analyze: Debian's systemd package.
systemd-tools:
	@command -v systemd-analyze >/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; }

test: venv systemd-tools
	$(PY) -m pytest -q

test-gpu: venv
	$(PY) -m pytest -q tests/gpu

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info bench/results
