"""The authorization-code flow with PKCE (RFC 6749 4.1, RFC 7636) for per-user connections.

:func:`start` (``integrations connections add SERVICE NAME``) makes a ``state`` and a PKCE
verifier, keeps them in the ledger (the state as its SHA-256, the verifier encrypted), bound
to the service and the connection for ten minutes, and returns the authorization URL for the
user to open. The provider sends the browser back to the receiver's ``GET /oauth/callback``,
where :func:`complete` takes the state (once: it is deleted as it is read), exchanges the code
with the verifier, and stores the tokens. A state that is unknown, used before or expired
changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from integrations.auth import endpoints, tokens
from integrations.auth.grants import OAuth2
from integrations.auth.keys import get_keys
from integrations.config import get_settings
from integrations.errors import CallError, ConfigError, IntegrationError, TransientError
from integrations.ledger import connections as ledger
from integrations.ledger.models import ConnectionStatus, utcnow
from integrations.services import Service, get_services
from integrations.services.http_service import HttpService

log = logging.getLogger(__name__)

#: How long an authorization may take, from the URL to the callback.
STATE_TTL = 600.0
#: Longer than any state we make; a longer one is not looked up.
STATE_MAX = 128


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _oauth2(svc: Service) -> tuple[HttpService, OAuth2]:
    auth = getattr(svc, "auth", None)
    if not isinstance(svc, HttpService) or not isinstance(auth, OAuth2):
        raise IntegrationError(
            f"service {svc.name} does not use the authorization-code flow (auth type oauth2); "
            "a connection of it takes tokens from files (--access-token-file) or a subject (--subject)"
        )
    return svc, auth


def redirect_uri(auth: OAuth2) -> str:
    return auth.redirect_url or get_settings().redirect_url


def start(svc: Service, name: str) -> str:
    """Begin authorizing connection ``name`` of ``svc``; return the URL its user opens.

    A connection that does not exist yet is made ``pending``; one that exists keeps its tokens
    and status until the new authorization completes (re-authorizing after ``needs_reauth``)."""
    _, auth = _oauth2(svc)
    state = secrets.token_urlsafe(32)
    # 64 characters of [A-Za-z0-9_-]: within RFC 7636's 43 to 128 unreserved characters.
    verifier = secrets.token_urlsafe(48)
    ciphertext, key_id = get_keys().encrypt(verifier.encode())
    uri = redirect_uri(auth)
    challenge: str = create_s256_code_challenge(verifier)  # type: ignore[no-untyped-call]
    ledger.ensure(svc.name, name, ConnectionStatus.PENDING)
    ledger.add_state(state_hash(state), svc.name, name, ciphertext, key_id, uri, STATE_TTL)
    return str(
        prepare_grant_uri(
            auth.authorize_url,
            auth.client_id,
            "code",
            redirect_uri=uri,
            scope=list(auth.scopes) or None,
            state=state,
            code_challenge=challenge,
            code_challenge_method="S256",
            **auth.authorize_params,
        )
    )


@dataclass(frozen=True)
class Result:
    """What the callback answers: an HTTP status and a line for the user."""

    status: int
    ok: bool
    message: str
    service: str | None = None
    connection: str | None = None


def complete(state: str | None, code: str | None, error: str | None) -> Result:
    """The provider's answer at the callback. Whatever it is, the state is used up; an
    unknown, replayed or expired state changes nothing else."""
    if not state or len(state) > STATE_MAX:
        return Result(
            400, False, "The request has no valid state; start again with integrations connections add."
        )
    taken = ledger.take_state(state_hash(state))
    if taken is None:
        return Result(400, False, "This authorization link is unknown or was already used.")
    where = {"service": taken.service, "connection": taken.connection}
    if taken.expires_at < utcnow():
        return Result(400, False, "This authorization expired (after 10 minutes); start it again.", **where)
    if error:
        word = error if error.replace("_", "").isalnum() and len(error) <= 64 else "an error"
        return Result(400, False, f"The authorization was not granted ({word}).", **where)
    if not code:
        return Result(400, False, "The provider sent no authorization code.", **where)
    found = get_services().get(taken.service)
    if found is None or not isinstance(found, HttpService) or not isinstance(found.auth, OAuth2):
        return Result(400, False, "The service of this authorization no longer uses OAuth2.", **where)
    svc, auth = found, found.auth
    try:
        verifier = get_keys().decrypt(taken.verifier, taken.key_id).decode()
    except ConfigError as e:  # ours, not the provider's: the operator is told, the user is not
        log.error("authorization of connection %s of %s: %s", taken.connection, svc.name, e)
        return Result(500, False, "This server cannot complete the authorization now; try later.", **where)
    try:
        granted = endpoints.exchange_code(svc, auth, code, verifier, taken.redirect_uri)
        tokens.store(svc, taken.connection, granted)
    except TransientError as e:
        log.warning("authorization of connection %s of %s: %s", taken.connection, svc.name, e)
        return Result(502, False, f"The token endpoint could not be reached ({e}); start again.", **where)
    except CallError as e:
        log.warning("authorization of connection %s of %s refused: %s", taken.connection, svc.name, e)
        return Result(400, False, f"The provider refused the authorization code: {e}", **where)
    except ConfigError as e:  # the tokens could not be encrypted here
        log.error("authorization of connection %s of %s: %s", taken.connection, svc.name, e)
        return Result(500, False, "This server cannot complete the authorization now; try later.", **where)
    row = ledger.get(svc.name, taken.connection)
    tokens.announce(svc.name, taken.connection, "authorized", {}, row.version if row else 0)
    return Result(200, True, "The connection is authorized; you can close this page.", **where)
