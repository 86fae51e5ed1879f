"""State every worker shares through Redis: the global rate limit, service pauses and breakers.

All decisions are single Lua scripts on Redis's own clock, so they are atomic across workers
and immune to clock skew between worker hosts. Without a Redis (the embedded defaults) there is
nothing to share and every call is allowed; Celery's per-worker ``rate_limit`` still applies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from integrations.config import Rate, get_settings
from integrations.services.base import Scope, Service

# GCRA (the generic cell rate algorithm): one timestamp per limit, the "theoretical arrival time"
# (TAT). A call of cost c may go when TAT + c * interval - now <= burst * interval; then TAT
# advances by c intervals. A call is under several limits at once (the service's, the agent's
# share, a kind's own: a Slack method, a channel, an LLM's tokens); one script decides for all of
# them, atomically, and takes a slot in each or in none.
# With reserve=1 a denied caller still takes the next free slots and learns how long to wait, so
# waiting callers queue up in order instead of stampeding when the window opens. Slots are kept
# only up to max_reserve_us ahead; a caller denied further out takes nothing and is parked.
# The slot taken in every limit is at the one time the call will go (now + wait, the latest any
# limit allows): a limit that would have allowed it sooner must count it when it happens, or
# calls held back by another limit would bunch up in it (a channel's posts waiting for the
# method's slots).
# KEYS: pause_1..pause_m, tat_1..tat_n
# ARGV: m, n, reserve, max_reserve_us, then per limit: interval_us, burst, ttl_ms, cost
# Returns {wait_us, now_us}: wait 0 = go now; a negative wait is a pause (no slot taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local m, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local longest = 0
for i = 1, m do
  local left = redis.call('PTTL', KEYS[i])
  if left > longest then longest = left end
end
if longest > 0 then return {-longest * 1000, now} end
local wait = 0
local tats = {}
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local interval = tonumber(ARGV[b + 1])
  local tat = tonumber(redis.call('GET', KEYS[m + i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat + interval * tonumber(ARGV[b + 4])
  local w = tats[i] - interval * tonumber(ARGV[b + 2]) - now
  if w > wait then wait = w end
end
if wait > 0 and (ARGV[3] == '0' or wait > tonumber(ARGV[4])) then return {wait, now} end
local at = now + wait
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local interval, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 4])
  local tat = tats[i] - interval * cost
  if tat < at then tat = at end
  redis.call('SET', KEYS[m + i], string.format('%d', tat + interval * cost), 'PX', ARGV[b + 3])
end
return {wait, now}
"""

# KEYS: pauses   ARGV: slot_us. Returns {longest pause left (ms), microseconds past the slot}.
_ON_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local longest = 0
for i = 1, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left > longest then longest = left end
end
return {longest, now - tonumber(ARGV[1])}
"""

# KEYS: pause   ARGV: ms. Extends a pause, never shortens it.
_PAUSE = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return left
"""

# KEYS: tat   ARGV: microseconds to add (negative: a refund). Moves a limit's TAT after the fact,
# once a call's real cost is known (an LLM's tokens); never below now. The key lives at least
# until the TAT it now holds, so a large charge is not forgotten when the key would expire.
_SETTLE = """
local tat = redis.call('GET', KEYS[1])
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local moved = tonumber(tat) + tonumber(ARGV[1])
if moved < now then moved = now end
local ttl = redis.call('PTTL', KEYS[1])
local needed = math.floor((moved - now) / 1000) + 60000
if needed > ttl then ttl = needed end
redis.call('SET', KEYS[1], string.format('%d', moved), 'PX', ttl)
return 1
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


def _keys(service: str, scope: str | None = None) -> tuple[str, str]:
    """The TAT key and the pause key of a service, or of one of its scopes."""
    suffix = service if scope is None else f"{service}:{scope}"
    return f"integrations:tat:{suffix}", f"integrations:pause:{suffix}"


@dataclass(frozen=True)
class Limit:
    """One limit a call is under: its TAT key, the rate granted at, the lateness absorbed, and
    how much of it the call takes."""

    key: str
    rate: Rate
    late: float
    cost: int = 1


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


def _limits(
    service: Service, agent: str | None, scopes: Sequence[Scope], include_service: bool
) -> tuple[list[Limit], list[str]]:
    """The limits a call is under and the pauses that hold it."""
    margin = get_settings().rate_limit_margin
    limits: list[Limit] = []
    pauses: list[str] = []
    if include_service:
        tat_key, pause_key = _keys(service.name)
        pauses.append(pause_key)
        if agent is not None and service.agent_limit is not None:
            limits.append(Limit(f"{tat_key}:agent:{agent}", *planned(service.agent_limit, margin)))
        if service.global_limit is not None:
            limits.append(Limit(tat_key, *planned(service.global_limit, margin)))
    for scope in scopes:
        tat_key, pause_key = _keys(service.name, scope.key)
        pauses.append(pause_key)
        if scope.rate is not None:
            rate, late = planned(scope.rate, margin)
            limits.append(Limit(tat_key, rate, late, cost=charged(scope, rate)))
    return limits, pauses


def charged(scope: Scope, rate: Rate) -> int:
    """What a call is charged before it goes: its cost, but never more than the burst granted at,
    which no wait could ever make room for (an LLM call asking for more tokens than a minute's
    budget would be deferred for ever); :func:`settle` charges the rest once it is known."""
    return min(max(1, scope.cost), rate.burst)


def acquire(
    service: Service,
    reserve_up_to: float = 0.0,
    agent: str | None = None,
    scopes: Sequence[Scope] = (),
    include_service: bool = True,
) -> Decision:
    """Take a slot of every limit the call is under, unless one of them is paused: the service's
    global limit and ``agent``'s share of it (``include_service``), and the kind's ``scopes``.

    A slot up to ``reserve_up_to`` seconds ahead is kept for the caller (``Decision.slot``),
    who then runs at that time after checking :func:`on_time`; a caller denied further out
    takes nothing.
    """
    r = client()
    if r is None:
        return Decision(0.0)
    limits, pauses = _limits(service, agent, scopes, include_service)
    if not limits and not pauses:
        return Decision(0.0)
    max_reserve_us = int(reserve_up_to * 1_000_000)
    args: list[int] = [len(pauses), len(limits), int(max_reserve_us > 0), max_reserve_us]
    for limit in limits:
        interval_us = int(1_000_000 / limit.rate.per_second)
        ttl_ms = (max_reserve_us + interval_us * (limit.rate.burst + limit.cost)) // 1000 + 60_000
        args += [interval_us, limit.rate.burst, ttl_ms, limit.cost]
    wait_us, now = (
        int(x)
        for x in r.eval(_ACQUIRE, len(pauses) + len(limits), *pauses, *(lim.key for lim in limits), *args)
    )
    if wait_us < 0:
        return Decision(-wait_us / 1_000_000, paused=True)
    if not limits:
        return Decision(0.0)
    if wait_us > max_reserve_us:
        return Decision(wait_us / 1_000_000)  # no slot taken
    # Every slot is kept for the caller; it runs when the latest of them comes.
    return Decision(wait_us / 1_000_000, slot=now + wait_us if wait_us > 0 else None, limited=True)


def on_time(
    service: Service,
    slot: int,
    agent: str | None = None,
    scopes: Sequence[Scope] = (),
    include_service: bool = True,
) -> Decision:
    """Check a kept slot when its time has come: still ``Decision(0)`` if nothing is paused and
    the caller is no later past the slot than its grant allowed for. A caller that comes later
    (a busy worker) takes a new slot instead, so late callers never bunch up and exceed the
    rate."""
    r = client()
    if r is None:
        return Decision(0.0)
    limits, pauses = _limits(service, agent, scopes, include_service)
    pause_ms, late_us = (int(x) for x in r.eval(_ON_TIME, len(pauses), *pauses, slot))
    if pause_ms > 0:
        return Decision(pause_ms / 1000, paused=True)
    # Later than the lateness its grant allowed for: the slot is spent, take a new one.
    grace_us = min((lim.late * 1_000_000 for lim in limits), default=0)
    if late_us <= grace_us:
        return Decision(0.0, limited=True)
    return acquire(service, get_settings().defer_countdown_max, agent, scopes, include_service)


def settle(service: Service, scope: Scope, actual_cost: int) -> None:
    """Correct a scope's count once a call's real cost is known (an LLM's tokens, charged an
    estimate before the call): the difference is added, or refunded."""
    r = client()
    if r is None or scope.rate is None:
        return
    rate, _ = planned(scope.rate, get_settings().rate_limit_margin)
    delta = actual_cost - charged(scope, rate)
    if delta == 0:
        return
    delta_us = int(delta * 1_000_000 / rate.per_second)
    r.eval(_SETTLE, 1, _keys(service.name, scope.key)[0], delta_us)


def pause(service: str, seconds: float, scope: str | None = None) -> None:
    """Hold every worker's calls to ``service`` (or those of one of its scopes: a Slack method)
    for ``seconds`` (an upstream's Retry-After)."""
    r = client()
    if r is not None and seconds > 0:
        r.eval(_PAUSE, 1, _keys(service, scope)[1], int(seconds * 1000))


def paused_for(service: str) -> float:
    r = client()
    if r is None:
        return 0.0
    return max(0.0, int(r.pttl(_keys(service)[1])) / 1000)
