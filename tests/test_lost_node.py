"""Losing a worker node on the default settings, as an operator would: real beat, no timing
changed, on Redis and on RabbitMQ (issue 15).

300 jobs go to two prefork nodes (concurrency 4, the default prefetch); one node is SIGKILLed
2.6 s after the first call reached the upstream. The jobs it held (running, or prefetched and
waiting) must each run again within 60 seconds of the kill, every job must succeed, and no job
may have two requests at the upstream at once. The recovery times are printed (``pytest -rP``)
for the README's Reliability table.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import DATABASE_URL
from procs import env_with, python, wait_for
from stub import Reply, Stub
from test_faults import (
    FAULT_SERVICES,
    assert_all_succeeded,
    assert_never_concurrent,
    beat,
    executions,
    redis_server,
    report,
    submit,
    wait_terminal,
    worker_nodes,
)

JOBS = 300
KILL_AFTER = 2.6
#: What the test promises: every job of the lost node runs again within this many seconds.
RECOVERY_BOUND = 60.0
#: Every setting that bears on the timings, removed from the environment: defaults only.
TIMINGS = (
    "STUCK_AFTER",
    "SWEEP_INTERVAL",
    "NODE_HEARTBEAT",
    "NODE_LOST_AFTER",
    "TASK_SOFT_TIME_LIMIT",
    "TASK_TIME_LIMIT",
    "VISIBILITY_TIMEOUT",
    "MAX_COUNTDOWN",
    "DEFER_COUNTDOWN_MAX",
    "WORKER_PREFETCH_MULTIPLIER",
    "CONSUMER_TIMEOUT",
)
_TASK_LINE = re.compile(r"Task integrations\.call\.flaky\[([0-9a-f-]{36})\] (received|succeeded)")


def defaults_env(broker_url: str, redis_url: str) -> dict[str, str]:
    """The processes' environment: ``broker_url``, and the test's Redis for coordination (and
    results); every timing at its default."""
    env = env_with(
        BROKER_URL=broker_url,
        COORDINATION_URL=redis_url,
        RESULT_BACKEND=None,  # the default: the Redis broker, or the coordination Redis
        DATABASE_URL=DATABASE_URL,
        SERVICES_FILE=FAULT_SERVICES,
    )
    for name in TIMINGS:
        env.pop(name, None)
    return env


def task_ids(log: Path) -> tuple[set[str], set[str]]:
    """The job ids a node's log says it received, and those it says succeeded."""
    received: set[str] = set()
    succeeded: set[str] = set()
    for job_id, what in _TASK_LINE.findall(log.read_text(errors="replace")):
        (received if what == "received" else succeeded).add(job_id)
    return received, succeeded


@pytest.mark.timeout(420)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_every_job_of_a_node_killed_on_default_settings_runs_again_within_a_minute(
    broker: str, tmp_path: Path, stub: Stub, key: str, request: pytest.FixtureRequest
) -> None:
    stub.plan(key, *[Reply(delay=0.5)] * (2 * JOBS))
    with redis_server(tmp_path) as server:
        if broker == "rabbitmq":
            _, amqp_url = request.getfixturevalue("rabbitmq_vhost")
            env = defaults_env(amqp_url, server.url)
        else:
            env = defaults_env(server.url, server.url)
        names = ["doomed", "survivor"]
        logs = [tmp_path / f"worker-{name}.log" for name in names]
        with (
            worker_nodes(names, env, tmp_path, ["-P", "prefork", "-c", "4"]) as (doomed, _),
            beat(env, tmp_path) as beat_log,
        ):
            ids = submit("flaky", key, JOBS, env)
            wait_for(lambda: stub.hits_for(key), 60, "the first call", logs[0])
            first = min(h.at for h in stub.hits_for(key))
            time.sleep(max(0.0, first + KILL_AFTER - time.time()))
            os.killpg(doomed.pid, signal.SIGKILL)
            killed = time.time()
            doomed.wait(timeout=10)
            rows = wait_terminal(ids, RECOVERY_BOUND + 120, [*logs, beat_log])
            all_done = time.time() - killed
            # The survivor's note of the jobs it holds empties once it finished them.
            coordination = redis.Redis.from_url(server.url)
            held = "integrations:node:survivor@*:held"  # a sorted set, gone once empty
            wait_for(lambda: not coordination.keys(held), 20, "the survivor's held jobs to be dropped")
            coordination.close()
            survivor_log = logs[1].read_text(errors="replace")
    assert_all_succeeded(rows)
    by_job = executions(stub, key, ids)
    twice = assert_never_concurrent(by_job)

    # What the killed node held: every job message it had received and not finished.
    received, succeeded = task_ids(logs[0])
    # (A job the killed node finished just before it died may lack its log line.)
    lost = {j for j in received - succeeded if rows[j]["finished_at"].timestamp() > killed}
    assert lost, "the killed node held jobs when it died"
    running = {j for j in lost if any(h.at < killed for h in by_job[j])}
    recovery: dict[str, float] = {}
    for job_id in lost:
        again = [h.at for h in by_job[job_id] if h.at >= killed]
        assert again, f"job {job_id} of the killed node never ran again"
        recovery[job_id] = again[0] - killed
    slowest = max(recovery.values())
    facts: dict[str, Any] = {
        "broker": broker,
        "lost_running": len(running),
        "lost_waiting": len(lost) - len(running),
        "recovered_s_max": round(slowest, 1),
        "recovered_s_median": round(statistics.median(recovery.values()), 1),
        "running_recovered_s_max": round(max((recovery[j] for j in running), default=0.0), 1),
        "all_done_s_after_kill": round(all_done, 1),
        "jobs_run_more_than_once": twice,
        "lost_node_logged": "worker nodes lost" in survivor_log,
    }
    report("lost node, default settings", **facts)
    assert slowest <= RECOVERY_BOUND, facts
    # Only a job whose call was in flight on the killed node may have run twice.
    assert twice <= len(running)


LIVENESS = """
import time
from integrations import liveness

def beats(node, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        liveness.beat(node)
        time.sleep(0.5)

liveness.beat("alive/1")
liveness.beat("dead/1", "job-held-by-dead")
beats("alive/1", 4)  # "dead/1" beat no more: past NODE_LOST_AFTER (3 s here)
print(sorted(liveness.lost(["ghost/1"])), liveness.held("dead/1"))
liveness.client().flushall()  # Redis restarted empty: no node's beat is there any more
liveness.beat("alive/1")
print(sorted(liveness.lost(["alive/1", "dead/1"])))
beats("alive/1", 4)
print(sorted(liveness.lost(["alive/1", "dead/1"])))
"""


@pytest.mark.timeout(60)
def test_a_node_is_lost_once_it_stops_beating_never_while_beats_resume_after_redis_came_back_empty(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as server:
        env = env_with(COORDINATION_URL=server.url, NODE_HEARTBEAT="0.5", NODE_LOST_AFTER="3")
        out = python(LIVENESS, env)
    assert out.returncode == 0, out.stderr[-2000:]
    lost, after_restart, later = out.stdout.strip().splitlines()
    # A node that stopped beating, and one the ledger names that never beat, are lost; the
    # lost node's held jobs are known.
    assert lost == "['dead/1', 'ghost/1'] ['job-held-by-dead']"
    # Redis came back empty: nobody's beat is there, yet nobody is lost until every node had
    # NODE_LOST_AFTER to beat again; then only the one that did not.
    assert after_restart == "[]"
    assert later == "['dead/1']"
