"""Auth schemes of HTTP services: their place in the services file, and the ``requests`` auth
object each becomes (built once per session, on first use, so a secret this process does not
have fails only the calls that need it).

The token-based types (OAuth2 and GitHub Apps, :mod:`integrations.auth.grants`) have no
session auth: their token belongs to a connection, kept encrypted in the ledger, and goes on
each request (:mod:`integrations.auth.tokens`), never into a pooled session.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from requests import PreparedRequest
from requests.auth import AuthBase, HTTPBasicAuth

from integrations.auth.grants import GithubApp, OAuth2, OAuth2ClientCredentials, OAuth2JwtBearer, TokenAuth
from integrations.config.schema import RequiredSecret, Strict
from integrations.config.secrets import Secret


class NoAuth(Strict):
    type: Literal["none"] = "none"


class BearerAuth(Strict):
    type: Literal["bearer"]
    token: RequiredSecret


class ApiKeyAuth(Strict):
    type: Literal["api_key"]
    key: RequiredSecret
    name: str = Field("X-API-Key", min_length=1, pattern=r"^[A-Za-z0-9_.~-]+$")
    location: Literal["header", "query"] = Field("header", alias="in")


class BasicAuth(Strict):
    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: Secret


Auth = Annotated[
    NoAuth
    | BearerAuth
    | ApiKeyAuth
    | BasicAuth
    | OAuth2ClientCredentials
    | OAuth2
    | OAuth2JwtBearer
    | GithubApp,
    Field(discriminator="type"),
]


def sent_values(auth: Auth) -> list[str]:
    """What ``auth`` puts on the wire besides its secrets as such (Basic's ``user:password``,
    whose base64 an upstream may echo), to keep out of what is stored."""
    if isinstance(auth, BasicAuth) and auth.password.available:
        return [f"{auth.username}:{auth.password.get()}"]
    return []


def token_auth(service: object) -> TokenAuth | None:
    """The service's token-based auth, if it has one (its tokens live in the ledger)."""
    auth = getattr(service, "auth", None)
    return auth if isinstance(auth, TokenAuth) else None


def per_user(service: object) -> bool:
    """Whether each job of ``service`` acts for an end user's connection."""
    auth = token_auth(service)
    return auth is not None and auth.per_user


def connection_refused(service: object, connection: str | None) -> str | None:
    """Why a job of ``service`` with ``connection`` is refused at submit, or ``None``: a
    service with per-user auth needs a connection, every other takes none."""
    name = getattr(service, "name", "?")
    if per_user(service) and connection is None:
        return (
            f"service {name} acts for an end user: give connection=<name> "
            f"(see integrations connections add {name} NAME)"
        )
    if not per_user(service) and connection is not None:
        return f"service {name} has no per-user connections; leave connection out"
    return None


class HeaderAuth(AuthBase):
    """Sets one header (``Authorization: Bearer ...`` or an API-key header) on every request."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        r.headers[self.name] = self.value
        return r


class QueryAuth(AuthBase):
    """Adds one query parameter (an API key) to every request."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        r.prepare_url(r.url, {self.name: self.value})
        return r


def requests_auth(auth: Auth) -> AuthBase | None:
    """The ``requests`` auth object for ``auth``; ``None`` for no auth. Raises
    :class:`~integrations.errors.ConfigError` when a secret it needs is not set here."""
    match auth:
        case NoAuth():
            return None
        case BearerAuth(token=token):
            return HeaderAuth("Authorization", "Bearer " + token.get())
        case ApiKeyAuth(location="header", name=name, key=key):
            return HeaderAuth(name, key.get())
        case ApiKeyAuth(name=name, key=key):
            return QueryAuth(name, key.get())
        case BasicAuth(username=username, password=password):
            return HTTPBasicAuth(username, password.get())
        case TokenAuth():
            return None  # a connection's token, set on each request (integrations.auth.tokens)
    raise AssertionError(f"unhandled auth type {type(auth).__name__}")
