# Two commands on a fresh machine: `make run` (the service on embedded defaults) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Worker autoscaling range (max,min); the settings' WORKER_AUTOSCALE_MAX/MIN are the defaults.
AUTOSCALE ?= $${WORKER_AUTOSCALE_MAX:-8},$${WORKER_AUTOSCALE_MIN:-2}

.PHONY: install run receiver metrics worker beat flower migrate test test-tools lint bench bench-ledger clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "make: $(PYTHON) has no venv module: apt-get install python3-venv" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/integrations migrate

# Where the processes keep their metrics for the exporter (emptied by `make run` as it starts).
METRICS_DIR = $${PROMETHEUS_MULTIPROC_DIR:-$${VAR_DIR:-var}/metrics}

# The webhook receiver, the metrics exporter, a worker and beat in one command (Ctrl-C stops
# them all). Embedded defaults: kombu's filesystem broker and SQLite under ./var; with
# BROKER_URL=redis://... and DATABASE_URL=postgresql+psycopg://... the real stack.
run: migrate
	$(BIN)/integrations services
	rm -f "$(METRICS_DIR)"/*.db
	$(BIN)/integrations receiver & receiver=$$!; $(BIN)/integrations metrics & exporter=$$!; \
	trap 'kill $$receiver $$exporter 2>/dev/null' EXIT INT TERM; \
	$(BIN)/celery -A tasks worker --beat --autoscale=$(AUTOSCALE) --loglevel=$${LOG_LEVEL:-INFO} \
	    --schedule=$${VAR_DIR:-var}/celerybeat-schedule

receiver: migrate
	exec $(BIN)/integrations receiver

# Prometheus metrics on METRICS_HOST:METRICS_PORT, beside the workers of this host.
metrics: migrate
	exec $(BIN)/integrations metrics

worker: migrate
	exec $(BIN)/celery -A tasks worker --autoscale=$(AUTOSCALE) --loglevel=$${LOG_LEVEL:-INFO}

beat: migrate
	exec $(BIN)/celery -A tasks beat --loglevel=$${LOG_LEVEL:-INFO} --schedule=$${VAR_DIR:-var}/celerybeat-schedule

# Flower on the real stack, behind basic auth (FLOWER_PASSWORD or FLOWER_PASSWORD_FILE); the
# password reaches Flower through its environment, not argv. FLOWER_PORT, FLOWER_ADDRESS.
flower: $(STAMP)
	exec $(BIN)/integrations flower

# What the tests run besides Python, as command:Debian package: their own redis-server (fault
# tests), openssl (test certificates), Dovecot (IMAP tests, tests/imap_server.py). Installed
# when missing (as root), or one line says what to install.
TEST_TOOLS := redis-server:redis-server openssl:openssl /usr/sbin/dovecot:dovecot-imapd

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test: the tests need:$$missing (sudo apt-get install$$missing)" >&2; exit 2; fi; \
	  echo "make test: installing$$missing"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

# Two test processes, a test file each at a time (pytest-xdist); each has its own database and
# Redis databases (tests/conftest.py). TEST_PROCESSES=1 runs them in this process.
TEST_PROCESSES ?= 2

test: $(STAMP) test-tools
	$(BIN)/pytest $$( [ "$(TEST_PROCESSES)" -gt 1 ] && echo "-n $(TEST_PROCESSES) --dist loadfile" )

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy integrations tasks beat_schedule.py tests

bench: $(STAMP)
	$(BIN)/python tests/bench.py --out bench-results.json

# `integrations stats`, `health` and `prune` on a generated ledger of a million jobs, in a
# database of its own (BENCH_LEDGER_DATABASE_URL, default .../bench_ledger, dropped and made
# again); BENCH_LEDGER_ARGS=--sqlite for a SQLite file.
bench-ledger: $(STAMP)
	$(BIN)/python tests/bench_ledger.py --out bench-ledger-results.json $(BENCH_LEDGER_ARGS)

clean:
	rm -rf $(VENV) var bench-results.json bench-ledger-results.json
