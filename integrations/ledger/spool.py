"""Outcomes the ledger could not take yet: kept aside, written once the database is back.

A worker that has made an upstream call must not lose what it learned because Postgres is away
longer than the task may run: the retrying ledger write is cut by the soft time limit, and the
job would stay ``running`` until the sweeper calls the upstream again. Instead the outcome is
put here (the shared Redis, or a file under ``VAR_DIR`` on the embedded defaults), the task
finishes, and the outcome is recorded by :func:`flush`: beat's sweeper runs it before it looks
for stuck jobs, and a worker runs it for one job when a message finds that job still running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from integrations import coordination
from integrations.config import get_settings
from integrations.ledger import jobs as ledger
from integrations.ledger.db import unreachable
from integrations.ledger.models import JobStatus

log = logging.getLogger(__name__)

KEY = "integrations:spool"


def _folder() -> Path:
    folder = get_settings().var_dir / "spool"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def put(claim: ledger.Claim, fields: dict[str, Any]) -> None:
    """Keep the outcome of ``claim``'s attempt (the keyword arguments of
    :func:`~integrations.ledger.jobs.record_attempt`) until :func:`flush` records it."""
    record = json.dumps(
        {
            "claim": [claim.job_id, claim.service, claim.operation, claim.attempt],
            "fields": {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in fields.items()},
        }
    )
    r = coordination.client()
    if r is not None:
        r.hset(KEY, claim.job_id, record)
        return
    path = _folder() / f"{claim.job_id}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(record)
    tmp.replace(path)


def _load(raw: str | bytes) -> tuple[ledger.Claim, dict[str, Any]]:
    data = json.loads(raw)
    job_id, service, operation, attempt = data["claim"]
    fields = dict(data["fields"])
    fields["status"] = JobStatus(fields["status"])
    for name in ("started_at", "next_attempt_at"):
        if fields.get(name):
            fields[name] = dt.datetime.fromisoformat(fields[name])
    return ledger.Claim(job_id, service, operation, {}, attempt), fields


def _pending(job_id: str | None) -> dict[str, str | bytes]:
    r = coordination.client()
    if r is not None:
        if job_id is not None:
            raw = r.hget(KEY, job_id)
            return {job_id: raw} if raw is not None else {}
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in r.hgetall(KEY).items()}
    folder = get_settings().var_dir / "spool"
    paths = [folder / f"{job_id}.json"] if job_id is not None else folder.glob("*.json")
    out: dict[str, str | bytes] = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            out[p.stem] = p.read_text()
    return out


def _forget(job_id: str) -> None:
    r = coordination.client()
    if r is not None:
        r.hdel(KEY, job_id)
    else:
        with contextlib.suppress(FileNotFoundError):
            (get_settings().var_dir / "spool" / f"{job_id}.json").unlink()


def flush(job_id: str | None = None) -> int:
    """Record the kept outcomes (of ``job_id`` only, when given); return how many were.

    Recording is idempotent (an attempt is stored once per number), so a flush that dies
    half-way is simply run again."""
    pending = _pending(job_id)
    done = 0
    for jid, raw in pending.items():
        claim, fields = _load(raw)
        try:
            try:
                ledger.write_attempt(claim, **fields)
            except SQLAlchemyError as e:
                if unreachable(e):
                    raise
                # Refused for what it holds, not for an outage: keep what the ledger takes.
                ledger.write_attempt(claim, **ledger.refused_fields(fields, e))
        except SQLAlchemyError as e:
            if unreachable(e):
                log.warning("ledger unavailable (%s); %d outcomes kept aside", type(e).__name__, len(pending))
                break
            log.error("job %s: a kept-aside outcome the ledger refused (%s); dropped", jid, type(e).__name__)
        _forget(jid)
        done += 1
    if done:
        log.info("recorded %d outcomes kept aside while the ledger was away", done)
    return done
