"""Requests to token endpoints: the grants of RFC 6749 (authorization code, refresh, client
credentials), RFC 7523's JWT bearer grant, GitHub's installation tokens, and RFC 7009
revocation.

Every request goes through :func:`integrations.http.send` (the SSRF guard with the service's
network settings, its timeout and CA bundle), without following redirects: a token endpoint
that redirects is refused rather than sent the client's credentials again. Authlib builds the
request bodies and PKCE values; PyJWT signs the JWTs.

Answers are classified in one place (:func:`_refusal`): ``invalid_grant`` (a refresh token or
code revoked, expired or used before) is :class:`InvalidGrant`; 429, 5xx and a connection that
fails are transient, so a token endpoint that is down never costs a connection; every other
refusal is permanent. A message names the service and the OAuth error code, never a body: a
token endpoint's answer holds tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import jwt
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from integrations import http
from integrations.auth import NoAuth
from integrations.auth.grants import GithubApp, OAuth2, OAuth2ClientCredentials, OAuth2JwtBearer
from integrations.config import RetryPolicy, get_settings
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.ssrf import Network

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: An OAuth error code as RFC 6749 5.2 spells them; anything else is not repeated.
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
#: GitHub's media type and API version (https://docs.github.com/en/rest/about-the-rest-api/api-versions).
GITHUB_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


class Holder(Protocol):
    """The service whose token endpoint is called: where it may connect, how long it waits."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def allow_private_network(self) -> bool: ...
    @property
    def allowed_networks(self) -> Sequence[Network]: ...
    @property
    def ca_bundle(self) -> Path | None: ...
    @property
    def retry(self) -> RetryPolicy: ...


@dataclass(frozen=True)
class Tokens:
    """What a token endpoint granted."""

    access_token: str
    refresh_token: str | None = None
    expires_at: dt.datetime | None = None
    scopes: list[str] | None = None

    def secret_json(self) -> bytes:
        """The part kept encrypted in the ledger."""
        return json.dumps({"access_token": self.access_token, "refresh_token": self.refresh_token}).encode()


class InvalidGrant(PermanentError):
    """The grant is gone: a refresh token or code revoked, expired or used before, an app
    uninstalled. The connection needs its user to authorize again."""


@dataclass(frozen=True)
class _Endpoint:
    """A service's token endpoint as a :class:`integrations.http.Peer`: the service's network
    settings, no credentials of the session (each request carries its own)."""

    name: str
    timeout: float
    allow_private_network: bool
    allowed_networks: tuple[Network, ...]
    ca_bundle: Path | None
    auth: NoAuth = field(default_factory=NoAuth)
    headers: dict[str, str] = field(default_factory=lambda: {"Accept": "application/json"})


def _peer(svc: Holder) -> _Endpoint:
    return _Endpoint(
        f"{svc.name}:token-endpoint",
        svc.timeout,
        svc.allow_private_network,
        tuple(svc.allowed_networks),
        svc.ca_bundle,
    )


def _post(svc: Holder, url: str, body: str, headers: dict[str, str]) -> http.Response:
    req = http.Request(
        "POST",
        url,
        content=body.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        follow_redirects=False,
    )
    return http.send(_peer(svc), req, get_settings().response_max_bytes)


def _client_auth(client_id: str, secret: str | None, method: str, fields: dict[str, Any]) -> dict[str, str]:
    """The client's credentials: an ``Authorization: Basic`` header (each part form-encoded
    first, RFC 6749 2.3.1), or ``client_id`` / ``client_secret`` in ``fields``."""
    if secret is not None and method == "basic":
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    fields["client_id"] = client_id
    if secret is not None:
        fields["client_secret"] = secret
    return {}


def _grant(
    svc: Holder,
    url: str,
    grant_type: str,
    fields: dict[str, Any],
    client: tuple[str, str | None, str] | None,
    what: str,
) -> Tokens:
    headers = _client_auth(*client, fields) if client is not None else {}
    body = prepare_token_request(grant_type, **fields)
    resp = _post(svc, url, body, headers)
    if not 200 <= resp.status_code < 300:
        raise _refusal(svc, resp, what)
    return _tokens(svc, resp, what)


def _tokens(svc: Holder, resp: http.Response, what: str) -> Tokens:
    """The tokens of a successful answer (RFC 6749 5.1)."""
    try:
        data = json.loads(resp.body)
    except ValueError:
        data = None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("access_token"), str)
        or not data["access_token"]
    ):
        raise PermanentError(f"{svc.name}: the token endpoint's answer to the {what} has no access_token")
    refresh = data.get("refresh_token")
    scope = data.get("scope")
    return Tokens(
        data["access_token"],
        refresh if isinstance(refresh, str) and refresh else None,
        _expiry(data.get("expires_in")),
        scope.split() if isinstance(scope, str) else None,
    )


def _expiry(expires_in: Any) -> dt.datetime | None:
    try:
        seconds = float(expires_in)
    except (TypeError, ValueError):
        return None  # no lifetime given: used until the upstream refuses it
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, seconds))


def _error_code(resp: http.Response) -> str | None:
    try:
        data = json.loads(resp.body)
    except ValueError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def _refusal(svc: Holder, resp: http.Response, what: str) -> CallError:
    """The error a refused token request stands for (RFC 6749 5.2)."""
    status = resp.status_code
    code = _error_code(resp)
    said = f" ({code})" if code else ""
    if status in (400, 401) and code == "invalid_grant":
        return InvalidGrant(f"{svc.name}: the {what} was refused (invalid_grant)", status_code=status)
    message = f"{svc.name}: the token endpoint answered the {what} with HTTP {status}{said}"
    general = http.classify(resp, svc.retry.retry_after_max)
    if isinstance(general, RateLimited):
        return RateLimited(message, status_code=status, retry_after=general.retry_after)
    if isinstance(general, TransientError) or 300 <= status < 400:
        # A redirect is not followed (the credentials would go with it); try again later.
        return TransientError(message, status_code=status)
    return PermanentError(message, status_code=status)


# --------------------------------------------------------------------------------------------
# The grants
# --------------------------------------------------------------------------------------------


def client_credentials(svc: Holder, auth: OAuth2ClientCredentials) -> Tokens:
    """RFC 6749 4.4: the service's own token."""
    fields: dict[str, Any] = {}
    if auth.scopes:
        fields["scope"] = list(auth.scopes)
    if auth.audience:
        fields["audience"] = auth.audience
    client = (auth.client_id, auth.client_secret.get(), auth.client_auth)
    return _grant(svc, auth.token_url, "client_credentials", fields, client, "client credentials grant")


def exchange_code(svc: Holder, auth: OAuth2, code: str, verifier: str, redirect_uri: str) -> Tokens:
    """RFC 6749 4.1.3 with the PKCE verifier (RFC 7636 4.5)."""
    fields = {"code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    secret = auth.client_secret.get() if auth.client_secret is not None else None
    client = (auth.client_id, secret, auth.client_auth)
    return _grant(svc, auth.token_url, "authorization_code", fields, client, "authorization code")


def refresh(svc: Holder, auth: OAuth2 | OAuth2ClientCredentials, refresh_token: str) -> Tokens:
    """RFC 6749 6. A new refresh token in the answer replaces the old one; none keeps it."""
    secret = auth.client_secret.get() if auth.client_secret is not None else None
    client = (auth.client_id, secret, auth.client_auth)
    tokens = _grant(
        svc, auth.token_url, "refresh_token", {"refresh_token": refresh_token}, client, "refresh token"
    )
    if tokens.refresh_token is None:
        return Tokens(tokens.access_token, refresh_token, tokens.expires_at, tokens.scopes)
    return tokens


def jwt_bearer(svc: Holder, auth: OAuth2JwtBearer, subject: str | None) -> Tokens:
    """RFC 7523 2.1: a JWT signed with the private key is the grant. ``scope`` goes both as a
    claim (Google reads it there: https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests)
    and as a parameter (RFC 7523)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": auth.issuer,
        "aud": auth.audience or auth.token_url,
        "iat": now,
        "exp": now + auth.assertion_lifetime,
    }
    if subject:
        claims["sub"] = subject
    if auth.scopes:
        claims["scope"] = " ".join(auth.scopes)
    assertion = _sign(svc, auth.private_key.get(), auth.algorithm, claims, auth.key_id)
    fields: dict[str, Any] = {"assertion": assertion}
    if auth.scopes:
        fields["scope"] = list(auth.scopes)
    return _grant(svc, auth.token_url, JWT_BEARER, fields, None, "JWT bearer grant")


def github_installation(svc: Holder, auth: GithubApp, installation_id: str) -> Tokens:
    """An installation access token: ``POST /app/installations/{id}/access_tokens`` with a JWT
    the app signs RS256 (issued a minute back for clock drift, valid 9 minutes: GitHub allows
    at most 10). https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app
    """
    if not installation_id.isdigit():
        raise PermanentError(f"{svc.name}: a GitHub App installation id is a number")
    now = int(time.time())
    claims = {"iat": now - 60, "exp": now + 540, "iss": auth.app_id}
    app_jwt = _sign(svc, auth.private_key.get(), "RS256", claims, None)
    url = f"{svc.base_url}/app/installations/{installation_id}/access_tokens"
    req = http.Request(
        "POST", url, headers={**GITHUB_HEADERS, "Authorization": f"Bearer {app_jwt}"}, follow_redirects=False
    )
    resp = http.send(_peer(svc), req, get_settings().response_max_bytes)
    what = "installation token request"
    if resp.status_code == 404:
        # The app was uninstalled (or never was): the connection must be made again.
        raise InvalidGrant(
            f"{svc.name}: GitHub has no installation {installation_id} of this app", status_code=404
        )
    if resp.status_code == 401:
        raise PermanentError(
            f"{svc.name}: GitHub refused the app's JWT (HTTP 401): check app_id and private_key",
            status_code=401,
        )
    if not 200 <= resp.status_code < 300:
        raise _refusal(svc, resp, what)
    try:
        data = json.loads(resp.body)
        token, expires = data["token"], data.get("expires_at")
        assert isinstance(token, str) and token
    except (ValueError, KeyError, TypeError, AssertionError):
        raise PermanentError(f"{svc.name}: GitHub's answer to the {what} has no token") from None
    try:
        expires_at = dt.datetime.fromisoformat(expires) if isinstance(expires, str) else None
    except ValueError:
        expires_at = None
    perms = data.get("permissions")
    scopes = sorted(f"{k}:{v}" for k, v in perms.items()) if isinstance(perms, dict) else None
    return Tokens(token, None, expires_at, scopes)


def _sign(svc: Holder, key: str, algorithm: str, claims: dict[str, Any], kid: str | None) -> str:
    try:
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)
    except (ValueError, TypeError, jwt.PyJWTError):
        # Not chained: the library's text could quote part of the key.
        raise PermanentError(f"{svc.name}: private_key is not a usable {algorithm} key (PEM)") from None


def revoke(svc: Holder, auth: OAuth2 | OAuth2ClientCredentials, token: str, hint: str) -> None:
    """RFC 7009: ask the provider to revoke ``token`` (a refresh token revokes the grant).
    200 means revoked (or unknown to it, which is as good); raises otherwise."""
    assert auth.revoke_url is not None
    fields: dict[str, Any] = {"token": token, "token_type_hint": hint}
    secret = auth.client_secret.get() if auth.client_secret is not None else None
    headers = _client_auth(auth.client_id, secret, auth.client_auth, fields)
    body = "&".join(f"{quote(k, safe='')}={quote(str(v), safe='')}" for k, v in fields.items())
    resp = _post(svc, auth.revoke_url, body, headers)
    if not 200 <= resp.status_code < 300:
        raise _refusal(svc, resp, "revocation")
