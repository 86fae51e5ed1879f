# Two commands on a fresh machine: `make run` (the service on embedded defaults) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Worker autoscaling range (max,min); the settings' WORKER_AUTOSCALE_MAX/MIN are the defaults.
AUTOSCALE ?= $${WORKER_AUTOSCALE_MAX:-8},$${WORKER_AUTOSCALE_MIN:-2}

.PHONY: install run receiver worker beat flower migrate test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/integrations migrate

# The webhook receiver, a worker and beat in one command (Ctrl-C stops all three). Embedded
# defaults: kombu's filesystem broker and SQLite under ./var; with BROKER_URL=redis://... and
# DATABASE_URL=postgresql+psycopg://... the real stack.
run: migrate
	$(BIN)/integrations services
	$(BIN)/integrations receiver & receiver=$$!; trap 'kill $$receiver 2>/dev/null' EXIT INT TERM; \
	$(BIN)/celery -A tasks worker --beat --autoscale=$(AUTOSCALE) --loglevel=$${LOG_LEVEL:-INFO} \
	    --schedule=$${VAR_DIR:-var}/celerybeat-schedule

receiver: migrate
	exec $(BIN)/integrations receiver

worker: migrate
	exec $(BIN)/celery -A tasks worker --autoscale=$(AUTOSCALE) --loglevel=$${LOG_LEVEL:-INFO}

beat: migrate
	exec $(BIN)/celery -A tasks beat --loglevel=$${LOG_LEVEL:-INFO} --schedule=$${VAR_DIR:-var}/celerybeat-schedule

# Flower on the real stack, behind basic auth (FLOWER_PASSWORD or FLOWER_PASSWORD_FILE); the
# password reaches Flower through its environment, not argv. FLOWER_PORT, FLOWER_ADDRESS.
flower: $(STAMP)
	exec $(BIN)/integrations flower

# The IMAP tests start their own Dovecot (tests/imap_server.py): Debian's dovecot-imapd, installed
# here when it is missing (as root, or say how).
DOVECOT := /usr/sbin/dovecot
$(DOVECOT):
	@if [ "$$(id -u)" != 0 ]; then echo "make: the IMAP tests need Dovecot: sudo apt-get install dovecot-imapd" >&2; exit 2; fi
	apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dovecot-imapd >/dev/null

test: $(STAMP) $(DOVECOT)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy integrations tasks beat_schedule.py tests

bench: $(STAMP)
	$(BIN)/python tests/bench.py --out bench-results.json

clean:
	rm -rf $(VENV) var bench-results.json
