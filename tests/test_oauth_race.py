"""The refresh race: many workers, one connection, an access token that expires every few
seconds, and an authorization server whose refresh tokens rotate and are single use (reusing
one answers ``invalid_grant``, which would cost the connection).

- Four worker nodes (``celery -A tasks worker``, four threads each, their own redis-server),
  400 jobs on one connection whose access token lives 4 s (renewed within 1 s of its end): every
  job succeeds, every refresh renews a token that was about to expire and its new token is
  used (one refresh per expiry), and the server answers no ``invalid_grant``.
- The same with that Redis emptied, every client dropped, while a refresh is in flight (a
  restart as the clients see it; see :func:`wipe` for why not a kill and a start): the lock is
  lost with it, the row lock in Postgres keeps the refresh single, and the jobs whose messages
  were lost are re-published by the sweeper.
- In one process, the lost lock made deterministic: a second renewal that gets the Redis lock
  while the first is still waiting for its answer waits on the row and uses the first's tokens.

Figures are printed (``pytest -rP``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REDIS_URL, most_in_window
from oauth_flow import connect
from procs import ROOT, python, running
from test_faults import assert_all_succeeded, redis_server, report, stack_env, wait_terminal, worker_nodes

from integrations.auth import tokens
from integrations.ledger import connections as ledger
from integrations.services import get_services

SERVICES = ROOT / "tests" / "oauth_race_services.yaml"
JOBS = 400
LIFETIME, SKEW = 4, 1  # oauth_race's refresh_skew is 1 s
RATE, BURST = 25, 5  # oauth_race's connection_rate_limit

SUBMIT = """
import json
from tasks import call_service
params = {{"key": {key!r}}}
ids = [call_service.delay("oauth_race", "echo", params, connection={name!r}).id for _ in range({n})]
print(json.dumps(ids))
"""

# Beat's part in the Redis test: the sweeper and the dispatcher of parked jobs, every second.
SWEEPER = """
import time
from tasks.maintenance import dispatch_deferred, requeue_stuck_jobs
while True:
    try:
        n = requeue_stuck_jobs() + dispatch_deferred()
        if n:
            print("requeued", n, flush=True)
    except Exception as e:
        print("sweep failed:", type(e).__name__, flush=True)
    time.sleep(1)
"""

#: Short bounds, so jobs lost with Redis come back within seconds (see tests/test_faults.py).
FAULT_SETTINGS: dict[str, Any] = {
    # Above DEFER_COUNTDOWN_MAX: a job waiting out its rate-limit countdown is not "stuck".
    "STUCK_AFTER": 15,
    "TASK_SOFT_TIME_LIMIT": 20,
    "TASK_TIME_LIMIT": 25,
    "MAX_COUNTDOWN": 10,
    "DEFER_COUNTDOWN_MAX": 10,
    "VISIBILITY_TIMEOUT": 60,
    "TASK_EVENTS": "false",
}


@pytest.fixture
def short_tokens(oauth: Any) -> Iterator[Any]:
    store = oauth.store
    for grant in ("authorization_code", "refresh_token"):
        store.lifetimes[grant] = LIFETIME
    yield store
    for grant in ("authorization_code", "refresh_token"):
        store.lifetimes.pop(grant, None)
    store.refresh_delay = 0.0


def submit(key: str, name: str, env: dict[str, str]) -> list[str]:
    out = python(SUBMIT.format(key=key, name=name, n=JOBS), env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ids: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(ids)) == JOBS
    return ids


def refresh_figures(store: Any, name: str, since: float, key: str) -> dict[str, Any]:
    """What the servers saw of the connection's refreshes and of the jobs' requests."""
    with store.lock:
        refreshes = [t for t, user in store.refreshes if user == name and t >= since]
        renewed = [t.access_token for t in store.tokens if t.user == name and t.issued_at >= since]
    hits = store.hits_for(key)
    ok = [h for h in hits if h.status == 200]
    gaps = [b - a for a, b in itertools.pairwise(refreshes)]
    return {
        "refreshes": refreshes,
        "renewed": renewed,
        "min_gap": min(gaps, default=None),
        "used": {h.token for h in ok},
        "requests": len(hits),
        "answered_401": sum(h.status == 401 for h in hits),
        "ok_times": sorted(h.at for h in ok),
    }


def assert_one_refresh_per_expiry(fig: dict[str, Any], invalid_grants: int) -> None:
    assert invalid_grants == 0, "a refresh token was used twice"
    assert len(fig["refreshes"]) >= 3, "the token should have expired several times during the run"
    # Each refresh renewed a token within SKEW of its end, never one renewed just before.
    assert fig["min_gap"] >= LIFETIME - SKEW - 0.5, fig["refreshes"]
    # Every token a refresh got was used: no refresh was wasted on a token already renewed.
    assert set(fig["renewed"]) <= fig["used"]
    # The connection's own rate limit held, but for the calls answered 401 (their token was
    # rotated while they were on their way): each went again, late, once the renewal was done.
    assert most_in_window(fig["ok_times"]) <= RATE + BURST + fig["answered_401"]


def assert_no_token_in(paths: list[Path], store: Any) -> None:
    issued = store.issued()
    for path in paths:
        text = path.read_text(errors="replace")
        assert not any(t in text for t in issued), f"a token in {path.name}"


@pytest.mark.timeout(360)
def test_four_worker_nodes_refresh_a_rotating_token_once_per_expiry(
    tmp_path: Path, short_tokens: Any, receiver: str, key: str
) -> None:
    store = short_tokens
    name = "race" + uuid.uuid4().hex[:8]
    connect("oauth_race", name, name)
    with redis_server(tmp_path) as server:
        env = stack_env(server.url, SERVICES_FILE=SERVICES)
        names = [f"race{i}" for i in range(4)]
        logs = [tmp_path / f"worker-{n}.log" for n in names]
        with worker_nodes(names, env, tmp_path, ["-P", "threads", "-c", "4"]):
            since, invalid = time.time(), store.invalid_grants
            # A token endpoint's latency: the refresh's answer comes 0.3 s after the rotation,
            # while the jobs keep coming (25 a second) and find the old token expiring.
            store.refresh_delay = 0.3
            ids = submit(key, name, env)
            rows = wait_terminal(ids, 180, logs)
            took = time.time() - since
    assert_all_succeeded(rows)
    fig = refresh_figures(store, name, since, key)
    assert_one_refresh_per_expiry(fig, store.invalid_grants - invalid)
    assert_no_token_in(logs, store)
    row = ledger.get("oauth_race", name)
    assert row is not None and row.status == "active"
    span = fig["ok_times"][-1] - fig["ok_times"][0]
    report(
        "refresh race",
        jobs=JOBS,
        run_s=round(took, 1),
        calls_span_s=round(span, 1),
        refreshes=len(fig["refreshes"]),
        expected_refreshes=round(span / (LIFETIME - SKEW), 1),
        min_s_between_refreshes=round(fig["min_gap"], 2),
        invalid_grant=store.invalid_grants - invalid,
        upstream_requests=fig["requests"],
        answered_401_then_retried=fig["answered_401"],
        busiest_second=most_in_window(fig["ok_times"]),
    )


def wipe(port: int) -> int:
    """Redis as a restart leaves it: empty (no lock, no queued message, no result), and every
    client's connection dropped. Returns how many connections were dropped.

    Not a kill and a start: while the server is down, a worker node's reconnection is refused,
    and kombu 5.7 then fails restoring the node's unacknowledged messages (AttributeError on a
    closed transport, "Unrecoverable error") and the node exits; tests/test_faults.py's Redis
    restart fails that way here too. Emptying the server and dropping its clients loses the
    same state without the refusals."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        client.flushall()
        dropped = int(client.client_kill_filter(_type="normal", skipme=True))
        return dropped + int(client.client_kill_filter(_type="pubsub"))
    finally:
        client.close()


@contextlib.contextmanager
def sweeper(env: dict[str, str], logs: Path) -> Iterator[Path]:
    log = logs / "sweeper.log"
    with running([sys.executable, "-c", SWEEPER], env, log):
        yield log


@pytest.mark.timeout(360)
def test_redis_emptied_during_a_refresh_still_refreshes_once(
    tmp_path: Path, short_tokens: Any, receiver: str, key: str
) -> None:
    store = short_tokens
    name = "redis" + uuid.uuid4().hex[:8]
    connect("oauth_race", name, name)
    with redis_server(tmp_path) as server:
        env = stack_env(server.url, SERVICES_FILE=SERVICES, **FAULT_SETTINGS)
        names = [f"red{i}" for i in range(4)]
        logs = [tmp_path / f"worker-{n}.log" for n in names]
        with (
            worker_nodes(names, env, tmp_path, ["-P", "threads", "-c", "4"]),
            sweeper(env, tmp_path) as swept,
        ):
            since, invalid = time.time(), store.invalid_grants
            # A refresh's tokens are rotated at once; its answer comes 1.5 s later: the window
            # in which the Redis lock goes away while the refresh is in flight.
            store.refresh_delay = 1.5
            ids = submit(key, name, env)
            store.refresh_started.clear()
            assert store.refresh_started.wait(60), "no refresh started"
            time.sleep(0.3)
            wiped = wipe(server.port)
            restarted = time.time()
            store.refresh_delay = 0.3
            rows = wait_terminal(ids, 240, [*logs, swept])
            took = time.time() - restarted
            requeued = sum(
                int(line.split()[1])
                for line in swept.read_text(errors="replace").splitlines()
                if line.startswith("requeued ")
            )
    assert_all_succeeded(rows)
    fig = refresh_figures(store, name, since, key)
    assert_one_refresh_per_expiry(fig, store.invalid_grants - invalid)
    assert_no_token_in(logs, store)
    row = ledger.get("oauth_race", name)
    assert row is not None and row.status == "active"
    lost = sum("the token lock was lost" in p.read_text(errors="replace") for p in logs)
    assert lost >= 1, "Redis was to be restarted while a node held the lock"
    report(
        "refresh race, redis emptied",
        connections_dropped=wiped,
        refreshes=len(fig["refreshes"]),
        min_s_between_refreshes=round(fig["min_gap"], 2),
        invalid_grant=store.invalid_grants - invalid,
        upstream_requests=fig["requests"],
        answered_401_then_retried=fig["answered_401"],
        nodes_that_lost_a_lock=lost,
        sweeper_requeues=requeued,
        all_done_s_after_restart=round(took, 1),
    )


def test_a_renewal_that_gets_a_lost_lock_waits_on_the_row_and_uses_the_first_ones_tokens(
    oauth: Any, receiver: str
) -> None:
    store = oauth.store
    name = "lost" + uuid.uuid4().hex[:8]
    connect("oauth_user", name, name)
    svc = get_services()["oauth_user"]
    stale = tokens.access_token(svc, name)  # type: ignore[arg-type]
    refreshes, invalid = len(store.refreshes), store.invalid_grants
    got: dict[str, str] = {}
    done: dict[str, float] = {}

    def renew(who: str) -> None:
        got[who] = tokens.renew(svc, name, stale=stale)  # type: ignore[arg-type]
        done[who] = time.monotonic()

    store.refresh_delay, store.refresh_started = 1.5, threading.Event()
    try:
        first = threading.Thread(target=renew, args=("first",))
        first.start()
        assert store.refresh_started.wait(10)
        # The lock vanishes (Redis restarted empty) while the first renewal waits for its answer.
        lock_key = f"integrations:connection-lock:oauth_user:{name}"
        assert redis.Redis.from_url(REDIS_URL).delete(lock_key) == 1
        second = threading.Thread(target=renew, args=("second",))
        started = time.monotonic()
        second.start()
        first.join(15)
        second.join(15)
    finally:
        store.refresh_delay = 0.0
    assert got["first"] == got["second"] != stale
    # The second renewal waited for the first's answer (not the AS: it would have said
    # invalid_grant to the used refresh token) and took its tokens from the row.
    assert done["second"] - started >= 0.5
    assert len(store.refreshes) == refreshes + 1 and store.invalid_grants == invalid
