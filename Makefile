# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned dependencies (requirements.lock) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-all data bench clean-outputs plots-offline browser

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock plots/package-lock.json plots/build_template.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	$(MAKE) --no-print-directory plots-offline
	touch $(STAMP)

# `dvc plots show` without internet: the vega libraries from npm (pinned in
# plots/package-lock.json) inline in a local page, which .dvc/config.local points DVC at.
# Without npm, DVC's default page (which loads vega from a CDN) stays.
plots-offline:
	@if command -v npm >/dev/null 2>&1 && npm ci --prefix plots --silent --no-audit --no-fund && \
		$(BIN)/python plots/build_template.py && \
		$(BIN)/dvc config --local plots.html_template ../plots/offline.html; then :; else \
		echo "NOTE: could not build plots/offline.html (needs npm): \`dvc plots show\` will load its plotting library from a CDN"; \
	fi

# The raw data: synthetic by default. A folder you put in data/ yourself is left alone.
data: $(STAMP)
	@if [ ! -d data ]; then \
		echo "== writing the synthetic EGD-CXR/MIMIC-CXR dataset into data/"; \
		$(BIN)/cxrgaze synth data; \
	fi

# `register` has no DVC output (the registry lives in the MLflow store), so DVC skips it when
# its inputs did not change, as on a fresh clone whose dvc.lock matches: run it every time
# (it moves nothing when nothing changed; dvc.lock stays the same).
demo: data
	$(BIN)/dvc repro
	$(BIN)/dvc repro --force --single-item register
	@git diff --quiet -- data.dvc 2>/dev/null || echo "NOTE: data/ differs from the committed data.dvc (your own data, or a changed generator): review and commit data.dvc"
	$(BIN)/cxrgaze summary

test: $(STAMP)
	$(BIN)/pytest

# Everything, including the slow end-to-end tests (the screenshot test drives Debian's
# headless Chromium: installed here when missing and this user may).
test-all: $(STAMP) browser
	$(BIN)/pytest -m "not gpu"

browser:
	@command -v chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "NOTE: no chromium (apt-get install chromium): the screenshot test will fail"

bench: $(STAMP)
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_batch_read.py
	$(BIN)/python bench/bench_gaze_resolution.py
	$(BIN)/python bench/bench_step.py

clean-outputs:
	rm -rf outputs
