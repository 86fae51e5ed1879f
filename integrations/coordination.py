"""State every worker shares through Redis: the global rate limit, service pauses and breakers.

All decisions are single Lua scripts on Redis's own clock, so they are atomic across workers
and immune to clock skew between worker hosts. Without a Redis (the embedded defaults) there is
nothing to share and every call is allowed; Celery's per-worker ``rate_limit`` still applies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import redis

from integrations.config import Rate, get_settings
from integrations.services.base import Service

# GCRA (the generic cell rate algorithm): one timestamp per service, the "theoretical arrival
# time" (TAT). A call may go when TAT - now <= burst * interval; then TAT += interval.
# With reserve=1 a denied caller still takes the next free slot and learns how long to wait,
# so waiting callers queue up in order instead of stampeding when the window opens.
# A slot is reserved only up to max_reserve_us ahead; a caller denied further out takes nothing
# and is parked, so reservations never run far ahead of the rate.
# KEYS: tat, pause   ARGV: interval_us, burst, reserve, ttl_ms, max_reserve_us
# Returns {wait_us, now_us}: wait 0 = go now; a negative wait is a pause (no slot taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {-pause * 1000, now} end
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > 0 and (ARGV[3] == '0' or wait > tonumber(ARGV[5])) then return {wait, now} end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ARGV[4])
if wait < 0 then wait = 0 end
return {wait, now}
"""

# KEYS: pause   ARGV: slot_us. Returns {pause_ms, microseconds past the slot}.
_ON_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return {redis.call('PTTL', KEYS[1]), now - tonumber(ARGV[1])}
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
    """``wait`` seconds before the call may go (0: now). ``slot``: when a slot is kept for the
    caller, its time on Redis's clock (microseconds). ``paused``: the upstream asked every
    worker to wait."""

    wait: float
    slot: int | None = None
    paused: bool = False
    #: A rate-limit slot was taken (the call is under a limit).
    limited: bool = False


def _keys(service: str) -> tuple[str, str]:
    return f"integrations:tat:{service}", f"integrations:pause:{service}"


def planned(rate: Rate, margin: float) -> tuple[Rate, float]:
    """The rate to grant at, and the lateness it absorbs, so that what the upstream sees stays
    within ``rate``: at most ``burst + per_second`` calls in any one-second window (and
    ``burst + per_second * W`` in longer ones), although each call may arrive up to the
    lateness after its grant.

    Granted at (r', b'), calls arriving up to L late land at most ``floor((1 + L) r') + b'`` in a
    second. The burst is spent first; only when it is not enough is the rate lowered (a service
    with burst 1 and a high rate pays the margin in throughput: give it a burst).
    """
    late = margin
    allowed = math.floor(rate.burst + rate.per_second + 1e-9)
    room = allowed - math.floor((1 + late) * rate.per_second + 1e-9)
    if room >= 1:
        return Rate(rate.per_second, min(rate.burst, room)), late
    return Rate(min(rate.per_second, allowed / (1 + late) * (1 - 1e-6)), 1), late


def _limits(service: Service, agent: str | None) -> list[tuple[str, Rate, float]]:
    """``(tat key, rate granted at, lateness absorbed)`` of each limit the call is under."""
    tat_key = _keys(service.name)[0]
    margin = get_settings().rate_limit_margin
    limits: list[tuple[str, Rate, float]] = []
    if agent is not None and service.agent_limit is not None:
        limits.append((f"{tat_key}:agent:{agent}", *planned(service.agent_limit, margin)))
    if service.global_limit is not None:
        limits.append((tat_key, *planned(service.global_limit, margin)))
    return limits


def acquire(service: Service, reserve_up_to: float = 0.0, agent: str | None = None) -> Decision:
    """Take a slot of the service's global rate limit (and of ``agent``'s own share of it, when
    the service sets one), unless the service is paused.

    A slot up to ``reserve_up_to`` seconds ahead is kept for the caller (``Decision.slot``),
    who then runs at that time after checking :func:`on_time`; a caller denied further out
    takes nothing.
    """
    r = client()
    if r is None:
        return Decision(0.0)
    limits = _limits(service, agent)
    pause_key = _keys(service.name)[1]
    if not limits:
        left_ms = int(r.pttl(pause_key))
        return Decision(left_ms / 1000, paused=True) if left_ms > 0 else Decision(0.0)
    wait_us, slot = 0, 0
    for key, limit, _ in limits:
        interval_us = int(1_000_000 / limit.per_second)
        ttl_ms = int(interval_us * (limit.burst + 1) / 1000) + 60_000
        max_reserve_us = int(reserve_up_to * 1_000_000)
        args = (interval_us, limit.burst, int(max_reserve_us > 0), ttl_ms, max_reserve_us)
        us, now = (int(x) for x in r.eval(_ACQUIRE, 2, key, pause_key, *args))
        if us < 0:
            return Decision(-us / 1_000_000, paused=True)
        if us > max_reserve_us:
            return Decision(us / 1_000_000)  # no slot taken
        wait_us, slot = max(wait_us, us), max(slot, now + us)
    # Every slot is kept for the caller; it runs when the latest of them comes.
    return Decision(wait_us / 1_000_000, slot=slot if wait_us > 0 else None, limited=True)


def on_time(service: Service, slot: int, agent: str | None = None) -> Decision:
    """Check a kept slot when its time has come: still ``Decision(0)`` if the service is not
    paused and the caller is no later than one interval past the slot. A caller that comes
    later (a busy worker) takes a new slot instead, so late callers never bunch up and exceed
    the rate."""
    r = client()
    if r is None:
        return Decision(0.0)
    pause_ms, late_us = (int(x) for x in r.eval(_ON_TIME, 1, _keys(service.name)[1], slot))
    if pause_ms > 0:
        return Decision(pause_ms / 1000, paused=True)
    # Later than the lateness its grant allowed for: the slot is spent, take a new one.
    grace_us = min((late * 1_000_000 for _, _, late in _limits(service, agent)), default=0)
    if late_us <= grace_us:
        return Decision(0.0, limited=True)
    return acquire(service, get_settings().defer_countdown_max, agent)


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
