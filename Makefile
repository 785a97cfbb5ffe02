# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: venv systemd-tools demo lint test test-gpu bench clean

# WHEELS=DIR: an offline host (a GPU image) installs what it lacks from that directory of wheels
# only: no index, no pip upgrade, no build isolation.
OFFLINE := $(if $(WHEELS),--no-index --find-links $(WHEELS) --no-build-isolation)

# A host that already has torch (a GPU host with its CUDA build) keeps it: the venv then sees the
# packages of the Python that has it, also when that Python is itself a venv (a .pth names its
# site-packages). Elsewhere the CPU build is installed, never an unpinned (CUDA) torch.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    $(PYTHON) -m venv --system-site-packages $(VENV) && \
	    $(PYTHON) -c "import site; print(*site.getsitepackages(), sep='\n')" \
	      > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/host-python.pth"; \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(if $(WHEELS),$(PY) -m pip install -q $(OFFLINE) 'setuptools>=68' wheel,$(PY) -m pip install -q --upgrade pip)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(OFFLINE) torch==2.13.0
	$(PY) -m pip install -q $(OFFLINE) -e '.[dev]'
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

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

# mypy needs the import names (loracache.daemon, ...): a tree of links gives them.
lint: $(LINT_STAMP)
	$(PY) -m ruff check .
	@mkdir -p build/typecheck/loracache
	@for part in daemon client shared; do ln -sfn ../../../$$part build/typecheck/loracache/$$part; done
	MYPYPATH=build/typecheck $(PY) -m mypy -p loracache.daemon -p loracache.client -p loracache.shared

# Two pytest workers: most tests wait on processes and sockets more than they compute. The
# longest start first (worksteal); TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2
test: venv systemd-tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Fails, never skips, when no CUDA device is usable (tests/gpu/conftest.py).
test-gpu: venv
	LORACACHE_REQUIRE_GPU=1 $(PY) -m pytest -q tests/gpu

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info bench/results
