# The README's two commands: `make demo` (set up, then run the notebook series on the embedded
# default) and `make test` (set up, then run the test suite). Both do all set-up on a fresh machine.
# `make demo` draws its figures in runs/figures/ (ignored by git: a demo leaves `git status` clean);
# `make figures` runs the same series but rewrites the committed figures/, on purpose, to be committed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch/torchvision pair to install first; override on machines that need another build,
# e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup data browser demo figures test quick-demo clean-runs

setup: $(VENV)/.installed data browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	# compat: the checkout on sys.path through a .pth file; the default (lenient) mode warns on every set-up
	$(BIN)/pip install --quiet -e '.[notebooks,test]' --config-settings editable_mode=compat
	touch $@

# Fashion-MNIST for the pretext task: found locally, or from the Debian package (installed when root).
data: $(VENV)/.installed
	$(BIN)/python -m bissl_kit.data prepare --allow-apt

# Chromium lets kaleido export PNG figures and runs the browser tests (tests/test_browser.py, driven by
# Playwright's Python package from the `test` extra; never `playwright install`). Without it the
# figures are written as HTML only and the browser tests are skipped (failed under CI).
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian chromium (PNG export of figures, browser tests)"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
	  || echo "warning: chromium could not be installed; figures will be HTML only, browser tests skipped"; \
	else echo "note: no chromium and no root/apt-get; figures will be HTML only, browser tests skipped"; fi

demo: setup
	$(BIN)/python -m bissl_kit.notebooks run

# The committed figures/*.png (HTML beside them, ignored): the demo's series with figures_dir=figures. Finished
# runs under runs/ are re-read, not redone, so after a `make demo` this redraws the demo's own numbers. Not
# redrawn here: figures/05_comparison.png (results/run_comparison.sh) and figures/browser/ (BISSL_SCREENSHOTS,
# tests/test_browser.py).
figures: setup
	$(BIN)/python -m bissl_kit.notebooks run --figures-dir figures

# Lint first (seconds; the rules are pyproject.toml's [tool.ruff]), then the suite.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean-runs:
	rm -rf runs notebooks/executed
