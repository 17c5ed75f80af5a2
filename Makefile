# Two commands for a fresh machine: `make demo` runs the pipeline on the embedded default,
# `make test` runs the test suite. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := /usr/bin/chromium

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The browser tests open reports in Debian's Chromium (driven by Playwright; nothing downloaded at run time).
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

demo: $(STAMP)
	$(BIN)/gptpipe demo

# Two test processes, each test file whole in one of them (its module fixtures built once): the
# integration tests mostly wait on servers and subprocesses, so two cores run them in ~2/3 of the time.
# Files are handed out in collection order (tests/conftest.py puts the longest first), not xdist's own
# order by number of tests, which left the one-test deployment files, the longest, for last.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
