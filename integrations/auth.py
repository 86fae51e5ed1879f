"""Auth schemes, as ``requests`` auth objects built once per session from a service's config."""

from __future__ import annotations

from requests import PreparedRequest
from requests.auth import AuthBase, HTTPBasicAuth

from integrations.config import ApiKeyAuth, Auth, BasicAuth, BearerAuth, NoAuth


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
    """The ``requests`` auth object for ``auth``; ``None`` for no auth."""
    match auth:
        case NoAuth():
            return None
        case BearerAuth(token=token):
            return HeaderAuth("Authorization", "Bearer " + token.get_secret_value())
        case ApiKeyAuth(location="header", name=name, key=key):
            return HeaderAuth(name, key.get_secret_value())
        case ApiKeyAuth(name=name, key=key):
            return QueryAuth(name, key.get_secret_value())
        case BasicAuth(username=username, password=password):
            return HTTPBasicAuth(username, password.get_secret_value())
    raise AssertionError(f"unhandled auth type {type(auth).__name__}")
