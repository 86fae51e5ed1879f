"""Tokens at rest and their keys: ``integrations keys rotate`` while a worker reads and rewrites
connections, resumed after it was killed, and an old key removed afterwards; processes that
would store tokens refuse to start without a key.

The rotation re-encrypts every encrypted value of the ledger, so the test rotates back to the
session's key at the end (the session's worker knows no other).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INTEGRATIONS_KEY
from cryptography.fernet import Fernet
from procs import BIN, ROOT, cli, env_with, python, running, wait_for

from integrations.auth import tokens
from integrations.auth.endpoints import Tokens
from integrations.auth.keys import key_id
from integrations.ledger import connections as ledger
from integrations.services import get_services

NEW_KEY = Fernet.generate_key().decode()
OLD_ID, NEW_ID = key_id(INTEGRATIONS_KEY.encode()), key_id(NEW_KEY.encode())

# A worker's part: read every connection again and again (each value checked), and rewrite a
# third of them on each pass, as refreshes would, until the time is up.
WORKER = """
import json, time
from integrations.auth import tokens
from integrations.auth.endpoints import Tokens
from integrations.auth.keys import get_keys
from integrations.ledger import connections as ledger
from integrations.services import get_services
svc = get_services()["oauth_user"]
names = {names!r}
values = {{}}
reads = failures = writes = passes = 0
until = time.monotonic() + {seconds}
while time.monotonic() < until:
    for i, name in enumerate(names):
        row = ledger.get("oauth_user", name)
        try:
            values[name] = json.loads(get_keys().decrypt(row.tokens, row.key_id))["access_token"]
            reads += 1
        except Exception as e:
            failures += 1
        if i % 3 == passes % 3:
            token = f"at-{{name}}-{{passes}}"
            tokens.store(svc, name, Tokens(token, "rt-" + token))
            values[name] = token
            writes += 1
    passes += 1
print(json.dumps({{"reads": reads, "failures": failures, "writes": writes, "values": values}}))
"""

READER = """
import json
from integrations.auth.keys import get_keys
from integrations.ledger import connections as ledger
out = {{}}
for name in {names!r}:
    row = ledger.get("oauth_user", name)
    out[name] = json.loads(get_keys().decrypt(row.tokens, row.key_id))["access_token"]
print(json.dumps(out))
"""


def keys_env(*keys: str) -> dict[str, str]:
    return env_with(INTEGRATIONS_KEYS=",".join(keys))


def run_json(code: str, env: dict[str, str], timeout: float = 120) -> Any:
    out = python(code, env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def rotated_back() -> Iterator[None]:
    yield
    back = cli("keys", "rotate", env=keys_env(INTEGRATIONS_KEY, NEW_KEY))
    assert back.returncode == 0, back.stdout + back.stderr
    assert set(ledger.key_counts()) <= {OLD_ID}


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("rotated_back")
def test_rows_stay_readable_before_during_and_after_a_rotation_and_the_old_key_can_go() -> None:
    svc = get_services()["oauth_user"]
    names = [f"rot{uuid.uuid4().hex[:6]}{n}" for n in range(300)]
    for name in names:  # encrypted with the session's key
        tokens.store(svc, name, Tokens(f"at-{name}-initial", f"rt-{name}"))  # type: ignore[arg-type]
    both = keys_env(NEW_KEY, INTEGRATIONS_KEY)

    # Before: a process with the new key first reads what the old key encrypted.
    before = run_json(READER.format(names=names), both)
    assert before == {n: f"at-{n}-initial" for n in names}

    # A rotation killed half-way leaves some values under each key, all readable.
    proc = subprocess.Popen(
        [str(BIN / "integrations"), "keys", "rotate", "--batch", "1"],
        env=both,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: ledger.key_counts().get(NEW_ID, 0) >= 20, 60, "the rotation to begin")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    half = ledger.key_counts()
    assert half.get(NEW_ID, 0) >= 20 and half.get(OLD_ID, 0) >= 20, half
    assert run_json(READER.format(names=names), both) == before

    # During: the rotation resumed while a worker reads every row and rewrites a third of them.
    worker = subprocess.Popen(
        [str(Path(BIN) / "python"), "-c", WORKER.format(names=names, seconds=8)],
        env=both,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    rotate = cli("keys", "rotate", "--batch", "5", env=both)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["failures"] == 0 and seen["reads"] >= len(names) and seen["writes"] > 0
    assert rotate.returncode == 0, rotate.stdout + rotate.stderr
    assert "re-encrypted" in rotate.stdout
    print("\n[keys rotate] " + " ".join(rotate.stdout.split()))

    # After: with the old key removed, every value is readable and is the last one written.
    new_only = keys_env(NEW_KEY)
    status = cli("keys", "status", env=new_only)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "NOT in INTEGRATIONS_KEYS" not in status.stdout
    assert run_json(READER.format(names=names), new_only) == seen["values"]
    assert set(ledger.key_counts()) == {NEW_ID}

    # A process that only has the old key cannot read them, and says why without a key.
    refused = python(READER.format(names=names[:1]), keys_env(INTEGRATIONS_KEY))
    assert refused.returncode != 0
    assert "cannot be decrypted with any key in INTEGRATIONS_KEYS" in refused.stderr
    assert INTEGRATIONS_KEY not in refused.stderr and NEW_KEY not in refused.stderr


def test_a_worker_and_the_receiver_refuse_to_start_without_a_key(tmp_path: Path) -> None:
    env = env_with(INTEGRATIONS_KEYS=None, INTEGRATIONS_KEYS_FILE=None)
    log = tmp_path / "worker.log"
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "solo", "--loglevel=INFO"]
    with running(cmd, env, log) as proc:
        code = proc.wait(timeout=90)
    text = log.read_text(errors="replace")
    assert code != 0 and "ready." not in text
    assert "INTEGRATIONS_KEYS is not set" in text and "oauth_user" in text
    receiver = cli("receiver", env=env)
    assert receiver.returncode == 2
    assert receiver.stderr.startswith("error: INTEGRATIONS_KEYS is not set")
    assert len(receiver.stderr.strip().splitlines()) == 1


def test_a_malformed_key_list_is_refused_naming_the_entry_not_the_value() -> None:
    bad = "not-a-fernet-key-" + uuid.uuid4().hex
    out = cli("keys", "status", env=keys_env(INTEGRATIONS_KEY, bad))
    assert out.returncode == 2
    assert "INTEGRATIONS_KEYS: key 2 is not a Fernet key" in out.stderr and bad not in out.stderr


def test_a_connection_whose_key_is_lost_can_still_be_revoked_locally() -> None:
    name = "lost" + uuid.uuid4().hex[:8]
    store = (
        "from integrations.auth import tokens\nfrom integrations.auth.endpoints import Tokens\n"
        "from integrations.services import get_services\n"
        f"tokens.store(get_services()['oauth_user'], {name!r}, Tokens('at-lost', 'rt-lost'))\n"
    )
    stored = python(store, keys_env(NEW_KEY))  # under a key this deployment no longer has
    assert stored.returncode == 0, stored.stderr[-2000:]
    told = cli("connections", "revoke", name, "--service", "oauth_user", env=keys_env(INTEGRATIONS_KEY))
    assert told.returncode != 0 and "cannot be decrypted" in told.stderr  # the provider needs the token
    out = cli(
        "connections",
        "revoke",
        name,
        "--service",
        "oauth_user",
        "--local-only",
        env=keys_env(INTEGRATIONS_KEY),
    )
    assert out.returncode == 0, out.stderr
    row = ledger.get("oauth_user", name)
    assert row is not None and row.status == "revoked" and row.tokens is None
