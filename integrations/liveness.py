"""Which worker nodes are alive, and which jobs each one holds, in the coordination Redis.

Every worker node beats every ``NODE_HEARTBEAT`` seconds and notes each job message it receives
(prefetched, waiting for a countdown, running). A node none of whose beats came for
``NODE_LOST_AFTER`` seconds is lost (SIGKILLed, out of memory, its host gone): beat's sweeper
then publishes again the jobs it had claimed (the ledger records the claiming node) and the
ones it held unclaimed, whose messages a Redis broker would give back only after its visibility
timeout (an hour), and RabbitMQ only once it notices the connection is gone.

A missing beat means a lost node only while beats have been flowing without a break for
``NODE_LOST_AFTER``: when Redis restarts empty, fails over, or no node reached it for a while,
every node has that long to beat again before any is declared lost.

Times are Redis's clock (``TIME``), so clocks of worker hosts never disagree. Without a
coordination Redis (the embedded defaults) nothing is recorded and nothing is ever lost here:
the sweeper's time bounds (``STUCK_AFTER``) stand alone.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Collection, Iterable
from typing import Any

import redis

from integrations.config import get_settings

#: Hash: node -> its last beat (Redis clock, microseconds).
NODES = "integrations:nodes"
#: Since when (Redis clock, microseconds) beats have come without a break; expires after one.
FLOW = "integrations:nodes:flow"
#: How long a held-jobs set outlives its node's last beat, unless the sweeper takes it first.
HELD_TTL_MS = 24 * 3600 * 1000
#: A held job the node no longer has is dropped from its set once it was noted this long ago
#: (the note is sent just before Celery records the message in the worker's state).
PRUNE_AFTER = 5.0


def held_key(node: str) -> str:
    """The sorted set of the job ids ``node`` holds (score: when it received them, its clock)."""
    return f"integrations:node:{node}:held"


# KEYS: nodes, flow, held   ARGV: node, flow_ttl_ms, held_ttl_ms, [job_id, received]
# A beat; with a job id, also notes that the node holds that job. Returns Redis's time (us).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local since = redis.call('GET', KEYS[2]) or string.format('%d', now)
redis.call('SET', KEYS[2], since, 'PX', ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now))
if ARGV[4] then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return now
"""


def new_node_id(hostname: str) -> str:
    """A name for one run of a worker node: its Celery node name and a random suffix, so a node
    restarted under the same name (a container's restart) is not taken for the one that died."""
    return f"{hostname}/{secrets.token_hex(4)}"


@functools.cache
def client() -> redis.Redis | None:
    """The coordination Redis with short socket timeouts (a beat must never hang a worker's
    consumer), or ``None`` without one."""
    url = get_settings().coordination_url
    if not url:
        return None
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10)


def _reset_after_fork() -> None:
    client.cache_clear()
    _script.cache_clear()


os.register_at_fork(after_in_child=_reset_after_fork)


@functools.cache
def _script() -> redis.commands.core.Script:
    r = client()
    assert r is not None
    return r.register_script(_BEAT)


def _flow_ttl_ms() -> int:
    # A break longer than two heartbeats: no node beat (all were gone, or Redis was).
    return int(2 * get_settings().node_heartbeat * 1000) + 1000


def beat(node: str, job_id: str | None = None) -> None:
    """Say ``node`` is alive; with ``job_id``, that it holds that job (a message it received)."""
    r = client()
    if r is None:
        return
    args: list[str | int | float] = [node, _flow_ttl_ms(), HELD_TTL_MS]
    if job_id is not None:
        args += [job_id, time.time()]
    _script()(keys=[NODES, FLOW, held_key(node)], args=args)


def prune(node: str, holding: Collection[str]) -> int:
    """Drop from ``node``'s set the jobs it no longer holds (``holding``: the ids it has now);
    only those noted more than :data:`PRUNE_AFTER` seconds ago. Returns how many."""
    r = client()
    if r is None:
        return 0
    noted = [_text(m) for m in r.zrangebyscore(held_key(node), "-inf", time.time() - PRUNE_AFTER)]
    gone = [m for m in noted if m not in holding]
    if gone:
        r.zrem(held_key(node), *gone)
    return len(gone)


def lost(candidates: Iterable[str] = ()) -> set[str]:
    """The lost nodes: those registered whose last beat is older than ``NODE_LOST_AFTER``, and
    those of ``candidates`` (nodes the ledger names) not registered at all. Empty while beats
    have not flowed without a break for ``NODE_LOST_AFTER``."""
    r = client()
    if r is None:
        return set()
    with r.pipeline(transaction=False) as p:
        p.time()
        p.get(FLOW)
        p.hgetall(NODES)
        (secs, micros), since, beats = p.execute()
    now = secs * 1_000_000 + micros
    window = int(get_settings().node_lost_after * 1_000_000)
    if since is None or now - int(since) < window:
        return set()
    last = {_text(k): int(v) for k, v in beats.items()}
    found = {node for node, at in last.items() if now - at > window}
    return found | {node for node in candidates if node not in last}


def held(node: str) -> list[str]:
    """The job ids ``node`` noted as held (some may have finished since)."""
    r = client()
    if r is None:
        return []
    return [_text(m) for m in r.zrange(held_key(node), 0, -1)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def forget(nodes: Iterable[str]) -> None:
    """Drop lost nodes once their jobs were taken care of (a node that beats again is back)."""
    r = client()
    nodes = list(nodes)
    if r is None or not nodes:
        return
    with r.pipeline(transaction=False) as p:
        p.hdel(NODES, *nodes)
        p.delete(*(held_key(n) for n in nodes))
        p.execute()


def leave(node: str) -> None:
    """A node stopping cleanly: its messages went back to the broker, its calls are done."""
    forget([node])
