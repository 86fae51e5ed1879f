"""Auth schemes of HTTP services: their place in the services file, and the ``requests`` auth
object each becomes (built once per session, on first use, so a secret this process does not
have fails only the calls that need it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from requests import PreparedRequest
from requests.auth import AuthBase, HTTPBasicAuth

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


Auth = Annotated[NoAuth | BearerAuth | ApiKeyAuth | BasicAuth, Field(discriminator="type")]


def sent_values(auth: Auth) -> list[str]:
    """What ``auth`` puts on the wire besides its secrets as such (Basic's ``user:password``,
    whose base64 an upstream may echo), to keep out of what is stored."""
    if isinstance(auth, BasicAuth) and auth.password.available:
        return [f"{auth.username}:{auth.password.get()}"]
    return []


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
    raise AssertionError(f"unhandled auth type {type(auth).__name__}")
