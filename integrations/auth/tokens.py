"""Connections' tokens in use: the access token for each request, refreshed exactly once per
expiry however many workers need it.

Before each attempt (:func:`send`) the connection's row is read and its access token
decrypted. When it expires within ``refresh_skew`` (or there is none yet) it is renewed
(:func:`renew`), single flight:

1. a lock per connection in the shared Redis (a file lock under VAR_DIR on the embedded
   defaults), so one worker renews while the others wait; in the first half of the skew the
   others do not even wait: their token is still good, and they go on with it (refresh ahead);
2. inside it the row is read again, held (``SELECT ... FOR UPDATE`` on Postgres) until the new
   tokens are written: a worker that waited finds them there and uses them. The row lock also
   covers the moment the Redis lock is lost (Redis restarted empty): two workers may then both
   hold "the" lock, but not the row, and the second sees the first's tokens;
3. the new access token and the new refresh token (when the provider rotates it, RFC 6749 6)
   are written in one statement, as one encrypted value.

A 401 from the upstream with a token believed valid costs one renewal (unless another worker
already renewed it) and one more try, within the same attempt; a second 401 is the upstream's
answer. ``invalid_grant`` at the token endpoint marks the connection ``needs_reauth``, stores
an event ``connection:needs_reauth`` for the handlers, and fails this job and every later one
of the connection at once, without calling the upstream. A token endpoint that is down is a
transient error: the job retries and the connection stays active.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import redis
from redis.exceptions import LockError

from integrations import coordination, http
from integrations.auth import endpoints, token_auth
from integrations.auth.endpoints import InvalidGrant, Tokens
from integrations.auth.grants import GithubApp, OAuth2, OAuth2ClientCredentials, OAuth2JwtBearer, TokenAuth
from integrations.auth.keys import get_keys
from integrations.config import get_settings
from integrations.errors import CallError, PermanentError, TransientError
from integrations.ledger import connections as ledger
from integrations.ledger import events as events_ledger
from integrations.ledger.connections import SERVICE_ROW, Row
from integrations.ledger.models import ConnectionStatus, utcnow

log = logging.getLogger(__name__)

#: Where a connection's events come from: ``connection:needs_reauth``, ``connection:authorized``.
EVENT_SOURCE = "connection"

#: ``publish(event_id)`` queues a stored event for its handlers (set by the app: tasks.events).
Publish = Callable[[str], None]
_publish: Publish | None = None


def set_event_publisher(publish: Publish | None) -> None:
    """Queue the events of connections with ``publish`` (without one, beat's sweeper does)."""
    global _publish
    _publish = publish


class TokenService(endpoints.Holder, Protocol):
    """An HTTP service with a token-based auth (an :class:`integrations.http.Peer` too)."""

    @property
    def auth(self) -> Any: ...
    @property
    def headers(self) -> dict[str, str]: ...
    def secret_values(self) -> list[str]: ...


@dataclass(frozen=True)
class Secret:
    access_token: str | None
    refresh_token: str | None


def _open(row: Row) -> Secret | None:
    if row.tokens is None:
        return None
    data = json.loads(get_keys().decrypt(row.tokens, row.key_id))
    return Secret(data.get("access_token"), data.get("refresh_token"))


def _auth(svc: TokenService) -> TokenAuth:
    auth = token_auth(svc)
    assert auth is not None, "tokens are only for services with a token-based auth"
    return auth


def _label(svc: TokenService, name: str) -> str:
    return f"connection {name} of {svc.name}" if name != SERVICE_ROW else f"the token of {svc.name}"


def row_name(svc: TokenService, connection: str | None) -> str:
    """The row a job's token is in: its connection, or the service's own."""
    if not _auth(svc).per_user:
        return SERVICE_ROW
    if connection is None:
        raise PermanentError(f"service {svc.name} acts for an end user: the call needs a connection")
    return connection


def _check_usable(svc: TokenService, name: str, row: Row | None) -> Row:
    label = _label(svc, name)
    if row is None:
        raise PermanentError(f"{label} does not exist (integrations connections add {svc.name} {name})")
    if row.status == ConnectionStatus.NEEDS_REAUTH:
        raise PermanentError(f"{label} needs re-authorization")
    if row.status == ConnectionStatus.REVOKED:
        raise PermanentError(f"{label} was revoked")
    if row.status == ConnectionStatus.PENDING:
        raise PermanentError(f"{label} is not authorized yet (its user has not finished the authorization)")
    return row


def _expiring(row: Row, skew: float) -> bool:
    return row.expires_at is not None and (row.expires_at - utcnow()).total_seconds() <= skew


# --------------------------------------------------------------------------------------------
# Use
# --------------------------------------------------------------------------------------------


def send(svc: TokenService, req: http.Request, connection: str | None, max_bytes: int) -> http.Response:
    """Send ``req`` with the access token of ``connection`` (or the service's own token) on
    this request only; on a 401, renew it once and send once more. The answer comes back with
    the tokens sent and the service's secrets masked."""
    name = row_name(svc, connection)
    token = access_token(svc, name)
    sent = [token]
    resp = _send(svc, req, token, max_bytes)
    if resp.status_code == 401:
        # We believed it valid: one renewal (none, if another worker renewed it since), one more try.
        token = renew(svc, name, stale=token)
        sent.append(token)
        resp = _send(svc, req, token, max_bytes)
    return resp.scrubbed([*svc.secret_values(), *sent])


def _send(svc: TokenService, req: http.Request, token: str, max_bytes: int) -> http.Response:
    return http.send(
        svc, replace(req, headers={**req.headers, "Authorization": f"Bearer {token}"}), max_bytes
    )


def access_token(svc: TokenService, name: str) -> str:
    """A usable access token of the connection ``name`` (:data:`SERVICE_ROW`: the service's
    own). One that expires within ``refresh_skew`` is renewed first: in the first half of that
    window by the one worker that gets the lock at once while the others use the token still,
    in the second half (or when it has expired) by every worker waiting for the renewal."""
    auth = _auth(svc)
    row = ledger.get(svc.name, name)
    if row is None and name == SERVICE_ROW:
        return renew(svc, name, stale=None)
    row = _check_usable(svc, name, row)
    secret = _open(row)
    if secret is None or secret.access_token is None:
        return renew(svc, name, stale=None)
    token = secret.access_token
    left = None if row.expires_at is None else (row.expires_at - utcnow()).total_seconds()
    if left is None or left > auth.refresh_skew:
        return token
    if left > auth.refresh_skew / 2:
        # Refresh ahead: one worker renews the token; the others go on with it meanwhile,
        # rather than all waiting for the token endpoint's answer.
        try:
            return _renew(svc, name, token, blocking=False) or token
        except TransientError:
            return token  # the token endpoint is down: this token still works, a later job retries
    return renew(svc, name, stale=token)


def renew(svc: TokenService, name: str, stale: str | None) -> str:
    """Get a new access token unless another worker did since ``stale`` was read; return the
    token to use. Single flight across every worker (see the module's docstring)."""
    token = _renew(svc, name, stale, blocking=True)
    assert token is not None
    return token


def _renew(svc: TokenService, name: str, stale: str | None, blocking: bool) -> str | None:
    """:func:`renew`; without ``blocking``, ``None`` when another worker holds the lock."""
    auth = _auth(svc)
    if name == SERVICE_ROW:
        ledger.ensure(svc.name, SERVICE_ROW, ConnectionStatus.ACTIVE)
    with single_flight(svc, name, blocking) as held_lock:
        if not held_lock:
            return None
        with ledger.for_refresh(svc.name, name) as held:
            token, failure, reauth = _renew_held(svc, auth, name, stale, held)
    if reauth is not None:
        announce(svc.name, name, "needs_reauth", {"reason": reauth[1]}, reauth[0])
    if failure is not None:
        failure.__cause__, failure.__context__, failure.__suppress_context__ = None, None, True
        raise failure
    return token


def _renew_held(
    svc: TokenService, auth: TokenAuth, name: str, stale: str | None, held: ledger.Refresh
) -> tuple[str, CallError | None, tuple[int, str] | None]:
    """The renewal itself, the row held: ``(token, failure, (version, reason) of a change to
    needs_reauth)``. Failures are returned, not raised, so what was written commits."""
    row = _check_usable(svc, name, held.row)
    secret = _open(row)
    current = secret.access_token if secret else None
    if current is not None and current != stale and not _expiring(row, auth.refresh_skew):
        return current, None, None  # renewed by another worker while this one waited
    try:
        tokens = _obtain(svc, auth, row, secret)
    except InvalidGrant as e:
        if name == SERVICE_ROW:
            held.failed(str(e))
            return "", e, None  # the service's own grant: its configuration must change, not a user
        reauth = (row.version, str(e)) if held.needs_reauth(str(e)) else None
        return "", PermanentError(f"{_label(svc, name)} needs re-authorization"), reauth
    except CallError as e:
        held.failed(str(e))  # the token endpoint is down, say: the connection stays active
        return "", e, None
    ciphertext, key_id = get_keys().encrypt(tokens.secret_json())
    if not held.store(ciphertext, key_id, tokens.expires_at, tokens.scopes):
        log.warning("%s: renewed tokens were not stored: the connection changed meanwhile", _label(svc, name))
    return tokens.access_token, None, None


def _obtain(svc: TokenService, auth: TokenAuth, row: Row, secret: Secret | None) -> Tokens:
    """New tokens from the token endpoint, the way ``auth`` gets them."""
    match auth:
        case OAuth2():
            if secret is None or secret.refresh_token is None:
                raise InvalidGrant(f"{svc.name}: the access token expired and there is no refresh token")
            return endpoints.refresh(svc, auth, secret.refresh_token)
        case OAuth2ClientCredentials():
            if secret is not None and secret.refresh_token is not None:
                return endpoints.refresh(svc, auth, secret.refresh_token)
            return endpoints.client_credentials(svc, auth)
        case OAuth2JwtBearer():
            subject = row.subject if auth.per_user else auth.subject
            if auth.per_user and not subject:
                raise PermanentError(f"{_label(svc, row.name)} has no subject (connections add --subject)")
            return endpoints.jwt_bearer(svc, auth, subject)
        case GithubApp():
            installation = row.subject if auth.per_user else str(auth.installation_id)
            if not installation:
                raise PermanentError(
                    f"{_label(svc, row.name)} has no installation id (connections add --subject)"
                )
            return endpoints.github_installation(svc, auth, installation)
    raise AssertionError(f"unhandled auth type {type(auth).__name__}")


# --------------------------------------------------------------------------------------------
# Tokens from elsewhere: an authorization's code exchanged, a file, a revocation
# --------------------------------------------------------------------------------------------


def store(svc: TokenService, name: str, tokens: Tokens) -> None:
    """Make ``name`` an active connection holding ``tokens`` (its user just authorized)."""
    ledger.ensure(svc.name, name, ConnectionStatus.PENDING)
    with single_flight(svc, name), ledger.for_refresh(svc.name, name) as held:
        assert held.row is not None
        ciphertext, key_id = get_keys().encrypt(tokens.secret_json())
        if not held.store(ciphertext, key_id, tokens.expires_at, tokens.scopes):
            raise TransientError(f"{_label(svc, name)} changed while its tokens were stored; try again")


def revoke(svc: TokenService, name: str, remote: bool = True) -> bool:
    """Revoke the connection: at the provider's RFC 7009 endpoint when it has one (and
    ``remote``), then its tokens are deleted. Returns whether the provider was told."""
    auth = _auth(svc)
    told = False
    with single_flight(svc, name), ledger.for_refresh(svc.name, name) as held:
        if held.row is None:
            raise PermanentError(f"{_label(svc, name)} does not exist")
        url = getattr(auth, "revoke_url", None)
        # Local only: the tokens go unread, so a connection whose key is lost can still go.
        secret = _open(held.row) if remote and url else None
        if secret is not None and isinstance(auth, OAuth2 | OAuth2ClientCredentials):
            if secret.refresh_token:
                endpoints.revoke(svc, auth, secret.refresh_token, "refresh_token")
            elif secret.access_token:
                endpoints.revoke(svc, auth, secret.access_token, "access_token")
            told = True
        held.revoke()
    return told


def announce(service: str, name: str, what: str, payload: dict[str, Any], version: int) -> None:
    """Store the event ``connection:<what>`` of a connection and queue it for the handlers."""
    body = {"service": service, "connection": name, **payload}
    try:
        event_id = events_ledger.store_event(EVENT_SOURCE, f"{service}/{name}/{what}/{version}", what, body)
        if event_id is not None and _publish is not None:
            _publish(event_id)
    except Exception as e:  # the sweeper dispatches an event stored but not queued
        log.warning("event connection:%s of %s/%s not queued (%s)", what, service, name, type(e).__name__)


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_flight(svc: TokenService, name: str, blocking: bool = True) -> Iterator[bool]:
    """Hold the connection's lock: in the shared Redis (every worker node), else a file lock
    under VAR_DIR (every process of this machine); yields whether it is held. Blocking, it
    waits as long as a renewal can take (two token requests' timeouts), and longer is a
    transient error (the job retries); else it yields ``False`` at once when the lock is taken."""
    wait = 2 * svc.timeout + 10
    # A SQLite ledger lives on one machine, whose file lock cannot be lost as a Redis key can
    # (Redis emptied mid-renewal); Postgres holds the row besides (ledger.for_refresh).
    r = None if get_settings().is_sqlite else coordination.client()
    if r is None:
        path = get_settings().var_dir / "locks" / f"connection-{quote(svc.name)}-{quote(name, safe='')}.lock"
        with _file_lock(path, wait if blocking else 0.0, f"{_label(svc, name)}") as held:
            yield held
        return
    lock = r.lock(
        f"integrations:connection-lock:{svc.name}:{name}", timeout=wait, sleep=0.02, blocking_timeout=wait
    )
    try:
        held = lock.acquire(blocking=blocking)
    except redis.RedisError as e:
        if not blocking:
            yield False  # the token has some life left: renew it another time
            return
        raise TransientError(
            f"{_label(svc, name)}: the shared Redis is unreachable ({type(e).__name__})"
        ) from None
    if not held:
        if not blocking:
            yield False
            return
        raise TransientError(f"{_label(svc, name)}: another worker's token renewal took over {wait:.0f}s")
    try:
        yield True
    finally:
        try:
            lock.release()
        except (LockError, redis.RedisError) as e:
            # Expired or lost with a Redis restart: the row lock kept the renewal single all the same.
            log.warning(
                "%s: the token lock was lost before its release (%s)", _label(svc, name), type(e).__name__
            )


@contextlib.contextmanager
def _file_lock(path: Path, wait: float, label: str) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path``, waiting up to ``wait`` seconds (0: one try); yields
    whether it is held."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = time.monotonic() + wait
    with path.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait <= 0:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise TransientError(
                        f"{label}: another process's token renewal took over {wait:.0f}s"
                    ) from None
                time.sleep(0.02)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
