# md5-light. `make run` starts the service, `make test` runs the tests;
# both set up .venv first, from nothing but Python 3.11+ and the registries.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

TOOLS   := .tools
MONGOSH := $(TOOLS)/node_modules/.bin/mongosh
MONGOSH_VERSION := 2.12.0

.PHONY: setup run test test-sources test-browser test-chaos test-image lint bench shell clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "md5-light needs Python 3.11 or newer")'
	@# The tests drive the service with curl and make TLS certificates with openssl.
	@command -v curl >/dev/null && command -v openssl >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq curl openssl)
	@# tests/test_partitions.py builds hosts in network namespaces with ip (iproute2).
	@command -v ip >/dev/null || (apt-get update -qq && apt-get install -y -qq iproute2)
	@# tests/test_segments.py fetches from Debian's nginx with a per-connection rate limit.
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

# The sources and trust suites (segmented downloads from throttled servers,
# FTP, an S3 server, ENA; manifests' limits, API keys) have a target of
# their own, so that make test stays well under ten minutes; CI runs both.
SOURCES := tests/test_segments.py tests/test_resume.py tests/test_ftp.py tests/test_s3.py \
	tests/test_store_claims.py tests/test_ena.py tests/test_manifest_limits.py \
	tests/test_access.py tests/test_mirrors.py

test: $(STAMP) $(MONGOSH)
	MONGOSH=$(abspath $(MONGOSH)) $(BIN)/python -m pytest --ignore=tests/test_partitions.py \
		--ignore=tests/test_resilience.py --ignore=tests/test_page.py \
		--ignore=tests/test_image.py --ignore=tests/test_embedded_patches.py \
		--ignore=tests/test_handoff.py \
		$(addprefix --ignore=,$(SOURCES)) $(PYTEST_ARGS)

# Where the data lives: big files over several connections (Debian's nginx
# with a per-connection rate limit), ftp://, S3 (moto), ENA's reports; and
# what a request may cost and who may see what (manifest limits, API keys).
test-sources: $(STAMP) $(MONGOSH)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light)
	MONGOSH=$(abspath $(MONGOSH)) $(BIN)/python -m pytest $(SOURCES) $(PYTEST_ARGS)

# The page in a real browser: Debian's Chromium driven by Playwright (whose
# own browser download does not work here). CI runs it after make test.
test-browser: $(STAMP) $(MONGOSH)
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	MONGOSH=$(abspath $(MONGOSH)) $(BIN)/python -m pytest tests/test_page.py $(PYTEST_ARGS)

# The chaos suite: workers killed mid-download, the database stopped under
# load, full restarts, and hosts in network namespaces whose links are cut
# (about four minutes, mostly waiting out leases; CI runs it after make test);
# the embedded database's write-path fixes against an unpatched server, and
# the handoff of tasks to the workers, read from the database's profiler.
test-chaos: $(STAMP) $(MONGOSH)
	@command -v ip >/dev/null || (apt-get update -qq && apt-get install -y -qq iproute2)
	MONGOSH=$(abspath $(MONGOSH)) $(BIN)/python -m pytest tests/test_resilience.py \
		tests/test_partitions.py tests/test_embedded_patches.py tests/test_handoff.py \
		$(PYTEST_ARGS)

# The container image, built from the Dockerfile and run as users run it
# (tests/test_image.py): Debian's podman stands in for Docker, a Debian
# bookworm made by debootstrap for python:3.11-slim (no registry here). All of
# podman's configuration and its image store live in IMAGE_CACHE (kept
# between runs: the base image and the build's layers); nothing of the
# machine's own container configuration is read or changed. Needs root.
IMAGE_CACHE ?= $(HOME)/.cache/md5-light/podman
test-image: $(STAMP)
	@for t in podman buildah runc debootstrap; do command -v $$t >/dev/null || need=1; done; \
	if [ -n "$$need" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap; fi
	MD5_IMAGE_CACHE=$(abspath $(IMAGE_CACHE)) $(BIN)/python -m pytest tests/test_image.py \
		-rP $(PYTEST_ARGS)

# ruff and mypy on the service's code (CI runs this before the tests).
lint: $(STAMP)
	$(BIN)/ruff check service handlers run.py
	$(BIN)/mypy

# The Mongo shell, from npm (its tests run the README's queries through it).
$(MONGOSH):
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	npm install --prefix $(TOOLS) --no-audit --no-fund --loglevel=error mongosh@$(MONGOSH_VERSION)

# mongosh on the database the service uses: MONGODB_URI, or the embedded
# one that `make run` started (its URI is in DATA_DIR/mongodb.uri).
shell: $(MONGOSH)
	@uri="$${MONGODB_URI:-$$(cat $${DATA_DIR:-data}/mongodb.uri 2>/dev/null)}"; \
	if [ -z "$$uri" ]; then echo "no database: start the service (make run) or set MONGODB_URI" >&2; exit 1; fi; \
	exec $(MONGOSH) "$$uri"

# The benchmarks' own packages (the Celery yardstick, matplotlib, py-spy),
# with their own stamp so that `make test`'s setup stays as it is.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

# Benchmarks (not part of `make test`): nginx from Debian serves the files,
# Debian's redis-server backs the Celery yardstick (bench.compare), Debian's
# aria2 is bench.segments' peer. Each
# runs even when one before it failed; make bench fails if any did.
bench: $(STAMP) $(BENCH_STAMP)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@# bench.segments compares against aria2c -x4 -s4 followed by md5sum.
	@command -v aria2c >/dev/null || (apt-get update -qq && apt-get install -y -qq aria2)
	@failed=""; \
	for b in perf digests segments claims compare scaling listing; do \
		$(BIN)/python -m bench.$$b || failed="$$failed bench.$$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

clean:
	rm -rf $(VENV) $(TOOLS) data .pytest_cache
