# altp2m-replay: `make run` and `make test` each set up .venv on their own.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
POLICIES := none baseline memaccess-write xen-access-altp2m-write xen-access-altp2m-exec \
            drakvuf-hidden-breakpoints drakvuf-hidden-breakpoints-fast hvmi-ve-pagetables \
            split-rx split-rx-mtf codemon-flip drakvuf-syscalls smartvmi-breakpoints-emulate

.DEFAULT_GOAL := help
.PHONY: help run test test-fast lint format bench clean guest

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) ## Replay the bundled sample traces under every built-in policy into reports/samples
	$(PY) -m altp2m_replay replay traces $(foreach p,$(POLICIES),-p $(p)) -o reports/samples

test: $(STAMP) ## Run the test suite
	$(PY) -m pytest -q

test-fast: $(STAMP) ## Edit-test loop: no browser, real processes or QEMU, few Hypothesis examples
	HYPOTHESIS_MAX_EXAMPLES=20 $(PY) -m pytest -q -x -k "not chromium and not dask and not processes and not capture_e2e and not real_guest and not ctrl_c and not killed"

lint: $(STAMP) ## ruff: formatting and lint rules (pyproject.toml), as CI and pre-commit check them
	$(VENV)/bin/ruff format --check altp2m_replay tests benchmarks
	$(VENV)/bin/ruff check altp2m_replay tests benchmarks

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format altp2m_replay tests benchmarks
	$(VENV)/bin/ruff check --fix altp2m_replay tests benchmarks

bench: $(STAMP) ## Throughput of SPEC §13 (bench command), then the pytest-benchmark suites
	$(PY) -m altp2m_replay bench
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=mean,stddev,rounds

guest: $(STAMP) ## Build the capture plugin and the guest for trace capture (qemu-system-x86, gcc, zstd)
	$(PY) -m altp2m_replay.capture

clean: ## Remove the virtual environment, caches and generated reports
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache reports/samples
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
