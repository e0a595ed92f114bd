# md5-light. `make run` starts the service, `make test` runs the tests;
# both set up .venv first, from nothing but Python 3.11+ and the registries.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "md5-light needs Python 3.11 or newer")'
	@# The tests drive the service with curl and make TLS certificates with openssl.
	@command -v curl >/dev/null && command -v openssl >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq curl openssl)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
