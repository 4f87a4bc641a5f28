# The two set-up commands of README.md: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip prints harmless "Location ... is ignored" lines on these machines
QUIET_PIP := { grep -v -e "is ignored" -e "^$$" || true; }

# Debian packages the tests need (the browser test drives Debian's Chromium; the
# scale-out tests run Open MPI's and MPICH's mpiexec (Open MPI stays the default), a
# one-node Slurm with munge, and sshd in network namespaces)
APT_PACKAGES := chromium openmpi-bin libopenmpi-dev mpich slurm-wlm munge openssh-server iproute2
APT_COMMANDS := chromium mpiexec mpiexec.mpich slurmctld slurmd sbatch munged sshd ip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck pytest pythons bench install system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | $(QUIET_PIP)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
	$(PY) -m kernel_engine.cli install --sys-prefix
	touch $@

# (an editable install leaves our own modules uncompiled; where PYTHONDONTWRITEBYTECODE
# is set, as on these machines, every controller would then compile them as it starts,
# a third of its start; compileall is quick when they are current)
install: $(VENV)/.installed
	$(PY) -m compileall -q jupyter_ext kernel_engine

demo: install
	$(PY) notebooks/run.py notebooks/quickstart.ipynb

lint: install
	$(VENV)/bin/ruff check jupyter_ext kernel_engine tests benchmarks notebooks
	$(VENV)/bin/ruff format --check jupyter_ext kernel_engine tests benchmarks notebooks

typecheck: install
	$(VENV)/bin/mypy

system-deps:
	@missing=; for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	[ -z "$$missing" ] || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $(APT_PACKAGES) >/dev/null; }

pytest: install system-deps
	$(PY) -m pytest -q -p no:randomly $(PYTEST_ARGS)

# the fast tests and the quickstart under Python 3.10, 3.12 and 3.13 too
pythons:
	.ci/other-pythons

test: lint typecheck pytest pythons

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[bench]" 2>&1 | $(QUIET_PIP)
	touch $@

bench: install $(VENV)/.bench-installed
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info
