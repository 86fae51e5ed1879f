"""Log lines: JSON when ``LOG_FORMAT=json``, readable text otherwise; beat's idle work at DEBUG.

The standard library's logging, with two formatters:

- :class:`JsonFormatter`: one JSON object per line, ``{"time", "level", "logger", "message",
  ...}`` plus the fields a record carries (a job event's ``event``, ``job_id``, ``service``,
  ``operation``, ``agent``, ``attempt``, ``status_code``, ``latency_ms``, ``error_class``...),
  the exception's text, and what the process adds (a Celery task's name and id).
- text: the process's own format (Celery's, or ``TEXT_FORMAT``); a job event's message
  already reads ``job <id> attempt 2 of stub.echo: 503 in 12.3 ms (TransientError)``.

Redaction (:mod:`integrations.redact`) happens when a record is made, by the record factory;
:class:`JsonFormatter` redacts its whole line once more, so what it adds besides the message
(the fields, an exception) is masked too.

:class:`QuietHousekeeping` puts Celery's own lines about beat's dispatchers and sweepers at
DEBUG when they found nothing to do (a task that returned 0), and the lines that only say they
were sent and received always: an idle deployment's log is quiet at INFO.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from integrations import redact

#: The format of text lines where the process has none of its own (receiver, CLI, exporter).
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"

#: The attribute of a record that holds its structured fields (``extra={"fields": {...}}``).
FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """One JSON object per record. ``context()`` adds fields of the moment (the Celery task)."""

    def __init__(self, context: Callable[[], Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        redact.redact_record(record)  # a record made before the factory was installed
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if self._context is not None:
            out.update(self._context())
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        line = json.dumps(out, ensure_ascii=False, default=str)
        if fields or record.exc_text or record.stack_info:
            # Once over the whole line: what the fields and the exception add is masked too (the
            # message was, when the record was made); a secret in its JSON-escaped form is one of
            # the forms redact() knows, and the separators' spaces keep a URL-credential pattern
            # from running across two fields.
            line = redact.redact(line)
        return line


def formatter(fmt: str, context: Callable[[], Mapping[str, Any]] | None = None) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT`` ``fmt``: JSON, or :data:`TEXT_FORMAT`."""
    if fmt == "json":
        return JsonFormatter(context)
    return logging.Formatter(TEXT_FORMAT)


def use_json(
    handlers: Iterable[logging.Handler], context: Callable[[], Mapping[str, Any]] | None = None
) -> None:
    """Give ``handlers`` (Celery's, once it set up its logging) the JSON formatter."""
    for handler in handlers:
        handler.setFormatter(JsonFormatter(context))
    logging.captureWarnings(True)  # a library's warning is a JSON line too, not raw text


def setup(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt``, for a process without a logging set-up
    of its own (the receiver, the CLI, the exporter); replaces the root's handlers."""
    redact.install()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler


# --------------------------------------------------------------------------------------------
# Beat's housekeeping, quiet when idle
# --------------------------------------------------------------------------------------------

# Celery's own lines (celery.worker.strategy, celery.app.trace, celery.beat), as the redacting
# record factory has already rendered them.
_TASK_LINE = re.compile(r"Task (?P<task>[\w.]+)\[[^\]]*\] (?P<what>received|succeeded in \S+: (?P<ret>.*))")
_BEAT_LINE = re.compile(r"Scheduler: Sending due task \S+ \((?P<task>[\w.]+)\)")
#: The loggers Celery writes those lines with.
CELERY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")


class QuietHousekeeping(logging.Filter):
    """Puts at DEBUG Celery's INFO lines about ``tasks`` (beat's dispatchers and sweepers):
    "sent" and "received" always, "succeeded" when the task returned 0 (nothing moved). A task
    that moved something still says so at INFO, in Celery's line and in its own."""

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        m = _TASK_LINE.match(message) or _BEAT_LINE.match(message)
        if m is None or m["task"] not in self.tasks:
            return True
        ret = m.groupdict().get("ret")
        if ret is not None and ret.strip() not in ("0", "None", "[]", "{}"):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_housekeeping(tasks: Iterable[str]) -> QuietHousekeeping:
    """Install :class:`QuietHousekeeping` for ``tasks`` on Celery's loggers (once per process)."""
    quiet = QuietHousekeeping(tasks)
    for name in CELERY_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, QuietHousekeeping)]:
            logger.removeFilter(old)
        logger.addFilter(quiet)
    return quiet
