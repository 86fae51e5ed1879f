"""State every worker shares through Redis: the global rate limit, service pauses and breakers.

All decisions are single Lua scripts on Redis's own clock, so they are atomic across workers
and immune to clock skew between worker hosts. Without a Redis (the embedded defaults) there is
nothing to share and every call is allowed; Celery's per-worker ``rate_limit`` still applies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis

from integrations.config import Rate, ServiceConfig, get_settings

# GCRA (the generic cell rate algorithm): one timestamp per service, the "theoretical arrival
# time" (TAT). A call may go when TAT - now <= burst * interval; then TAT += interval.
# With reserve=1 a denied caller still takes the next free slot and learns how long to wait,
# so waiting callers queue up in order instead of stampeding when the window opens.
# A slot is reserved only up to max_reserve_us ahead; a caller denied further out takes nothing
# and is parked, so reservations never run far ahead of the rate.
# KEYS: tat, pause   ARGV: interval_us, burst, reserve, ttl_ms, max_reserve_us
# Returns microseconds to wait: 0 = go now. A negative number is a pause (no slot taken).
_ACQUIRE = """
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return -pause * 1000 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > 0 and (ARGV[3] == '0' or wait > tonumber(ARGV[5])) then return wait end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ARGV[4])
if wait < 0 then wait = 0 end
return wait
"""

# KEYS: pause   ARGV: ms. Extends a pause, never shortens it.
_PAUSE = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return left
"""


@functools.cache
def client() -> redis.Redis | None:
    """The shared Redis, or ``None`` on the embedded defaults."""
    url = get_settings().coordination_url
    return redis.Redis.from_url(url) if url else None


@dataclass(frozen=True)
class Decision:
    """``wait`` seconds before the call may go (0: now). ``reserved``: a slot is kept for the
    caller at that time. ``paused``: the upstream asked every worker to wait."""

    wait: float
    reserved: bool = False
    paused: bool = False


def _keys(service: str) -> tuple[str, str]:
    return f"integrations:tat:{service}", f"integrations:pause:{service}"


def acquire(service: ServiceConfig, reserve_up_to: float = 0.0, agent: str | None = None) -> Decision:
    """Take a slot of the service's global rate limit (and of ``agent``'s own share of it, when
    the service sets one), unless the service is paused.

    A slot up to ``reserve_up_to`` seconds ahead is kept for the caller, who runs then without
    asking again (``Decision.wait``); a caller denied further out takes nothing.
    """
    r = client()
    if r is None:
        return Decision(0.0)
    tat_key, pause_key = _keys(service.name)
    limits: list[tuple[str, Rate]] = []
    if agent is not None and service.agent_limit is not None:
        limits.append((f"{tat_key}:agent:{agent}", service.agent_limit))
    if service.global_limit is not None:
        limits.append((tat_key, service.global_limit))
    if not limits:
        left_ms = int(r.pttl(pause_key))
        return Decision(left_ms / 1000, paused=True) if left_ms > 0 else Decision(0.0)
    wait = 0.0
    for key, limit in limits:
        d = _take(r, key, pause_key, limit, reserve_up_to)
        if d.paused or (d.wait > 0 and not d.reserved):
            return d
        wait = max(wait, d.wait)
    # Every slot is kept for the caller; it runs when the latest of them comes.
    return Decision(wait, reserved=wait > 0)


def _take(r: redis.Redis, tat_key: str, pause_key: str, limit: Rate, reserve_up_to: float) -> Decision:
    interval_us = int(1_000_000 / limit.per_second)
    ttl_ms = int(interval_us * (limit.burst + 1) / 1000) + 60_000
    max_reserve_us = int(reserve_up_to * 1_000_000)
    us = int(
        r.eval(
            _ACQUIRE,
            2,
            tat_key,
            pause_key,
            interval_us,
            limit.burst,
            int(max_reserve_us > 0),
            ttl_ms,
            max_reserve_us,
        )
    )
    if us < 0:
        return Decision(-us / 1_000_000, paused=True)
    return Decision(us / 1_000_000, reserved=us <= max_reserve_us)


def pause(service: str, seconds: float) -> None:
    """Hold every worker's calls to ``service`` for ``seconds`` (an upstream's Retry-After)."""
    r = client()
    if r is not None and seconds > 0:
        r.eval(_PAUSE, 1, _keys(service)[1], int(seconds * 1000))


def paused_for(service: str) -> float:
    r = client()
    if r is None:
        return 0.0
    return max(0.0, int(r.pttl(_keys(service)[1])) / 1000)
