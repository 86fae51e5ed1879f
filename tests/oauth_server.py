# mypy: disable-error-code="no-untyped-call"
"""A real OAuth 2 authorization server and resource server on loopback, for the connection tests,
built from Authlib's server classes on Flask (https://docs.authlib.org/en/latest/flask/2/).

The authorization server grants:

- client credentials (RFC 6749 4.4) to the client ``machine``;
- authorization code with PKCE required (RFC 7636) to the client ``webapp``, whose users are
  logged in by a cookie ``user=<name>`` (the test's "browser" sets it), ``consent=deny`` to say no;
- refresh tokens that rotate and are single use, as strict providers do: a refresh answers a
  new refresh token, and the old one (and its access token) is revoked at once, so reusing it
  answers ``invalid_grant``;
- RFC 7523 JWT bearer grants to the client ``svcacct`` (its public key verifies them);
- RFC 7009 revocation.

It stands in for GitHub's installation-token endpoint too (``POST /github/app/installations/
{id}/access_tokens``, the app's RS256 JWT checked with PyJWT; body from
https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app).

The resource server (``/api/...`` and ``/github/...``) accepts only current access tokens:
issued here, not expired, not revoked. Everything is counted, so the tests can say how many
refreshes and ``invalid_grant`` answers there were and which token each request carried.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import jwt
from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerGrant
from authlib.oauth2.rfc7636 import CodeChallenge
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, request
from gcal_server import Calendar, add_calendar
from joserfc.jwk import RSAKey
from werkzeug.serving import make_server

ALL_AUTH = ["client_secret_basic", "client_secret_post"]
# One line per request would drown the tests' own output.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def rsa_pair() -> tuple[str, str]:
    """``(private PEM, public PEM)`` of a new 2048-bit RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@dataclass
class Client(ClientMixin):
    client_id: str
    secret: str | None
    grant_types: tuple[str, ...]
    scope: str = "read write calendar"
    public_key: str | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: Any) -> str:
        allowed = set(self.scope.split())
        asked = scope.split() if isinstance(scope, str) else list(scope or ())
        return " ".join(s for s in asked if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri.startswith("http://127.0.0.1:") and redirect_uri.endswith("/oauth/callback")

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and secrets.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ALL_AUTH or (method == "none" and self.secret is None)

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class Token(TokenMixin):
    client_id: str
    user: str | None
    access_token: str
    refresh_token: str | None
    scope: str
    expires_in: int
    issued_at: float = field(default_factory=time.time)
    revoked: bool = False
    #: The access token alone revoked (the refresh token still works).
    access_revoked: bool = False
    #: Which grant made it (a refresh, a code, ...).
    grant: str = ""

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked or self.access_revoked

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    code_challenge: str | None
    code_challenge_method: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Hit:
    """One request to the resource server: when, for which key, with which token, answered how."""

    at: float
    path: str
    token: str | None
    user: str | None
    status: int


class Store:
    """The server's state, shared by its threads, and what the tests read."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.tokens: list[Token] = []
        #: Seconds an access token lives, per grant type (default for the others).
        self.lifetimes: dict[str, int] = {}
        self.default_lifetime = 3600
        #: Answer this many token requests with 503 first (a token endpoint that is down).
        self.fail_next = 0
        #: Hold each refresh's answer this long after the tokens are rotated.
        self.refresh_delay = 0.0
        self.refresh_started = threading.Event()
        self.grants: Counter[str] = Counter()
        self.refreshes: list[tuple[float, str]] = []  # (time, user)
        self.invalid_grants = 0
        self.revocations: list[str] = []
        self.github_installations: dict[str, str] = {}  # installation id -> account
        self.github_app_key: str | None = None
        self.github_app_id = "1234"
        self.hits: list[Hit] = []
        #: Paths the resource server always answers 401.
        self.always_401: set[str] = set()

    def lifetime(self, grant_type: str) -> int:
        return self.lifetimes.get(grant_type, self.default_lifetime)

    def by_access(self, value: str) -> Token | None:
        with self.lock:
            return next((t for t in self.tokens if t.access_token == value), None)

    def by_refresh(self, value: str) -> Token | None:
        with self.lock:
            return next((t for t in self.tokens if t.refresh_token == value), None)

    def issued(self) -> list[str]:
        """Every token this server ever issued (access and refresh): none may leak."""
        with self.lock:
            return [v for t in self.tokens for v in (t.access_token, t.refresh_token) if v]

    def revoke_user(self, user: str) -> None:
        """The user withdrew the app's access: every token of theirs is revoked."""
        with self.lock:
            for t in self.tokens:
                if t.user == user:
                    t.revoked = True

    def revoke_access(self, value: str) -> None:
        """The access token ``value`` stops working before its time (its refresh token does not)."""
        token = self.by_access(value)
        assert token is not None
        with self.lock:
            token.access_revoked = True

    def hits_for(self, key: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if f"/{key}" in h.path]


# ------------------------------------------------------------------------------------------------
# Authlib's grants, bound to the store
# ------------------------------------------------------------------------------------------------


def build_app(store: Store) -> Flask:
    app = Flask("oauth_test_server")

    def save_token(token: dict[str, Any], req: Any) -> None:
        user = getattr(req, "user", None)
        with store.lock:
            store.tokens.append(
                Token(
                    req.client.client_id,
                    user if isinstance(user, str) else None,
                    token["access_token"],
                    token.get("refresh_token"),
                    token.get("scope", ""),
                    int(token.get("expires_in", 0)),
                    grant=request.form.get("grant_type", ""),
                )
            )

    server = AuthorizationServer(app, query_client=store.clients.get, save_token=save_token)

    def expires(client: Any, grant_type: str) -> int:
        return store.lifetime(grant_type)

    server.register_token_generator(
        "default",
        BearerTokenGenerator(
            lambda **_: "at-" + secrets.token_urlsafe(24),
            lambda **_: "rt-" + secrets.token_urlsafe(32),
            expires,
        ),
    )

    class ClientCredentials(grants.ClientCredentialsGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH

    class AuthorizationCode(grants.AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = [*ALL_AUTH, "none"]  # noqa: RUF012 (Authlib's attribute)

        def save_authorization_code(self, code: str, req: Any) -> None:
            data = req.payload.data
            with store.lock:
                store.codes[code] = Code(
                    code,
                    req.client.client_id,
                    req.payload.redirect_uri,
                    req.payload.scope or "",
                    req.user,
                    data.get("code_challenge"),
                    data.get("code_challenge_method"),
                )

        def query_authorization_code(self, code: str, client: Any) -> Any:
            found = store.codes.get(code)
            return found if found is not None and found.client_id == client.client_id else None

        def delete_authorization_code(self, code: Any) -> None:
            with store.lock:
                store.codes.pop(code.code, None)

        def authenticate_user(self, code: Any) -> Any:
            return code.user

    class Refresh(grants.RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH
        INCLUDE_NEW_REFRESH_TOKEN = True  # rotate

        def authenticate_refresh_token(self, refresh_token: str) -> Any:
            token = store.by_refresh(refresh_token)
            return token if token is not None and not token.revoked else None

        def authenticate_user(self, token: Any) -> Any:
            return token.user

        def revoke_old_credential(self, token: Any) -> None:
            # Single use: the old refresh token and its access token are dead from now on.
            with store.lock:
                token.revoked = True

    class JwtBearer(JWTBearerGrant):
        def resolve_issuer_client(self, issuer: str) -> Any:
            return store.clients.get(issuer)

        def resolve_client_public_key(self, client: Any) -> Any:
            return RSAKey.import_key(client.public_key)

        def authenticate_user(self, subject: str) -> Any:
            return subject

        def has_granted_permission(self, client: Any, user: Any) -> bool:
            return True

        def get_audiences(self) -> list[str]:
            return [request.host_url.rstrip("/") + "/token"]

    class Revocation(RevocationEndpoint):
        CLIENT_AUTH_METHODS = ALL_AUTH

        def query_token(self, token_string: str, token_type_hint: Any) -> Any:
            return store.by_refresh(token_string) or store.by_access(token_string)

        def revoke_token(self, token: Any, req: Any) -> None:
            with store.lock:
                token.revoked = True
                store.revocations.append(token.refresh_token or token.access_token)

    server.register_grant(ClientCredentials)
    server.register_grant(AuthorizationCode, [CodeChallenge(required=True)])
    server.register_grant(Refresh)
    server.register_grant(JwtBearer)
    server.register_endpoint(Revocation)
    # Token requests one at a time: a refresh token is checked and rotated atomically.
    token_lock = threading.Lock()

    @app.get("/authorize")
    def authorize() -> Response:
        user = request.cookies.get("user")
        if not user:
            return Response("log in first", status=401)
        grant_user = None if request.cookies.get("consent") == "deny" else user
        try:
            grant = server.get_consent_grant(end_user=user)  # the consent page: checks the request
        except OAuth2Error as error:
            return cast(Response, server.handle_error_response(server.create_oauth2_request(None), error))
        return cast(Response, server.create_authorization_response(grant_user=grant_user, grant=grant))

    @app.post("/token")
    def token() -> Response:
        grant = request.form.get("grant_type", "")
        if grant == "refresh_token":
            store.refresh_started.set()
        with token_lock:
            if store.fail_next > 0:
                store.fail_next -= 1
                return Response(json.dumps({"error": "temporarily_unavailable"}), status=503)
            resp = cast(Response, server.create_token_response())
            with store.lock:
                if resp.status_code == 200:
                    store.grants[grant] += 1
                    if grant == "refresh_token":
                        store.refreshes.append((time.time(), store.tokens[-1].user or ""))
                elif b"invalid_grant" in resp.get_data():
                    store.invalid_grants += 1
        if grant == "refresh_token" and resp.status_code == 200 and store.refresh_delay:
            time.sleep(store.refresh_delay)  # the new tokens exist; their answer is late
        return resp

    @app.post("/revoke")
    def revoke() -> Response:
        return cast(Response, server.create_endpoint_response("revocation"))

    protector = ResourceProtector()

    class Validator(BearerTokenValidator):
        def authenticate_token(self, token_string: str) -> Any:
            return store.by_access(token_string)

    protector.register_token_validator(Validator())

    def protected(path: str, answer: Callable[[Token], Response], refusal: Any = None) -> Response:
        raw = request.headers.get("Authorization", "")
        sent = raw[7:] if raw.startswith("Bearer ") else None
        try:
            tok: Token = protector.acquire_token()
            if path in store.always_401:
                raise OAuth2Error("invalid_token", status_code=401)
        except OAuth2Error:
            with store.lock:
                store.hits.append(Hit(time.time(), path, sent, None, 401))
            body = refusal if refusal is not None else {"error": "invalid_token"}
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"', "Content-Type": "application/json"}
            return Response(json.dumps(body), status=401, headers=headers)
        resp = answer(tok)
        with store.lock:
            store.hits.append(Hit(time.time(), path, sent, tok.user, resp.status_code))
        return resp

    @app.route("/api/<path:rest>", methods=["GET", "POST"])
    def api(rest: str) -> Response:
        path = "/api/" + rest

        def answer(tok: Token) -> Response:
            body = {"path": path, "user": tok.user, "client": tok.client_id, "scope": tok.scope}
            return Response(json.dumps(body), status=200, content_type="application/json")

        return protected(path, answer)

    @app.post("/github/app/installations/<installation>/access_tokens")
    def github_token(installation: str) -> Response:
        raw = request.headers.get("Authorization", "")
        try:
            claims = jwt.decode(
                raw.removeprefix("Bearer "), store.github_app_key or "", algorithms=["RS256"], leeway=5
            )
        except (jwt.PyJWTError, ValueError):
            return Response(json.dumps({"message": "A JSON web token could not be decoded"}), status=401)
        if claims.get("iss") != store.github_app_id or claims["exp"] - claims["iat"] > 600:
            return Response(json.dumps({"message": "'Issuer' claim ('iss') must be an Integer"}), status=401)
        account = store.github_installations.get(installation)
        if account is None:
            return Response(json.dumps({"message": "Not Found", "status": "404"}), status=404)
        value = "ghs_" + secrets.token_urlsafe(27)
        lifetime = store.lifetime("github")
        with store.lock:
            store.grants["github"] += 1
            store.tokens.append(Token("github-app", account, value, None, "", lifetime))
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + lifetime))
        # The documented answer (201 Created), shortened.
        body = {
            "token": value,
            "expires_at": expires,
            "permissions": {"issues": "write", "contents": "read"},
            "repository_selection": "selected",
        }
        return Response(json.dumps(body), status=201, content_type="application/json")

    @app.route("/github/repos/<path:rest>", methods=["GET"])
    def github_api(rest: str) -> Response:
        path = "/github/repos/" + rest

        def answer(tok: Token) -> Response:
            return Response(
                json.dumps({"full_name": rest, "owner": tok.user}), content_type="application/json"
            )

        return protected(path, answer)

    app.extensions["oauth_protected"] = protected
    return app


class OAuthServer:
    """The servers on a loopback port, in a thread."""

    def __init__(self, port: int) -> None:
        self.store = Store()
        self.app = build_app(self.store)
        self.calendar = Calendar()
        add_calendar(self.app, self.calendar)
        self.port = port
        self._server = make_server("127.0.0.1", port, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OAuthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    def add_client(self, client: Client) -> None:
        with self.store.lock:
            self.store.clients[client.client_id] = client
