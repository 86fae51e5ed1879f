"""A circuit breaker per service, its state shared by every worker through Redis.

closed --(threshold consecutive failures)--> open --(reset_timeout)--> half-open
half-open: one probe call at a time; its success closes the breaker, its failure opens it again.
While open, calls are deferred (not failed, not charged an attempt). Each transition is returned
to the caller, which records it in the ledger with its time and reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from integrations.coordination import client
from integrations.services.base import Service

# KEYS: state hash, probe key   ARGV: reset_ms, probe_ttl_ms
# Returns {wait_ms, transition}: wait_ms 0 = go (maybe as the probe).
_ALLOW = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then return {0, ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_ms') or '0')
local reopen = opened + tonumber(ARGV[1])
if now < reopen then return {reopen - now, ''} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  if state == 'open' then return {0, 'half_open'} end
  return {0, ''}
end
return {1000, ''}
"""

# KEYS: state hash, probe key   ARGV: ok (1/0), threshold
# Returns the transition ('' if none).
_RECORD = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'failures', 0)
  if state ~= 'closed' then
    redis.call('HSET', KEYS[1], 'state', 'closed')
    redis.call('DEL', KEYS[2])
    return 'closed'
  end
  return ''
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half_open' or (state == 'closed' and failures >= tonumber(ARGV[2])) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_ms', now)
  redis.call('DEL', KEYS[2])
  return 'open'
end
return ''
"""


@dataclass(frozen=True)
class Gate:
    wait: float  # seconds until a call may go; 0: now
    transition: str = ""  # 'half_open' when this caller became the probe


def _keys(service: str) -> tuple[str, str]:
    return f"integrations:breaker:{service}", f"integrations:breaker-probe:{service}"


def allow(service: Service) -> Gate:
    r = client()
    b = service.breaker
    if r is None or b is None:
        return Gate(0.0)
    wait_ms, transition = r.eval(_ALLOW, 2, *_keys(service.name), int(b.reset_timeout * 1000),
                                 int((service.timeout + 5) * 1000))  # fmt: skip
    return Gate(int(wait_ms) / 1000, transition.decode() if isinstance(transition, bytes) else transition)


def record(service: Service, ok: bool) -> str:
    """Count a call's outcome; return the transition it caused: 'open', 'closed' or ''."""
    r = client()
    b = service.breaker
    if r is None or b is None:
        return ""
    out = r.eval(_RECORD, 2, *_keys(service.name), int(ok), b.threshold)
    return out.decode() if isinstance(out, bytes) else str(out or "")


def state(service: str) -> str:
    r = client()
    if r is None:
        return "closed"
    raw = r.hget(_keys(service)[0], "state")
    return raw.decode() if isinstance(raw, bytes) else "closed"


def reset(service: str) -> None:
    """Close the breaker (a healthy check, or an operator)."""
    r = client()
    if r is not None:
        r.delete(*_keys(service))
