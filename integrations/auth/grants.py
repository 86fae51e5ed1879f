"""The auth types whose credential is a token got from a token endpoint, and how each is
written in the services file.

- ``oauth2_client_credentials``: the service's own token (RFC 6749 4.4).
- ``oauth2``: authorization code with PKCE (RFC 6749 4.1, RFC 7636), one connection per end user.
- ``oauth2_jwt_bearer``: a JWT signed with a private key exchanged for a token (RFC 7523), as
  a Google service account does; per user when the connection names the subject.
- ``github_app``: a JWT signed RS256 with the app's key, exchanged for an installation token
  (https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app);
  per connection (one per installation) unless the installation is fixed here.

Tokens are kept encrypted in the ledger (table ``connections``) and refreshed by
:mod:`integrations.auth.tokens`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from integrations.config.schema import RequiredSecret, Strict, check_url
from integrations.config.secrets import Secret

#: A scope as RFC 6749 3.3 allows it: printable ASCII but space, '"' and '\'.
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
ClientAuth = Literal["basic", "post"]


class TokenAuth(Strict):
    """What every token-based auth type has."""

    type: str

    #: Refresh an access token that expires within this many seconds, before the attempt.
    refresh_skew: float = Field(300, ge=0, le=3600)

    @field_validator("token_url", "authorize_url", "revoke_url", "redirect_url", check_fields=False)
    @classmethod
    def _urls(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v, what="URL", query_allowed=True)

    @field_validator("scopes", check_fields=False)
    @classmethod
    def _scope_form(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not _SCOPE.fullmatch(s) for s in v):
            raise ValueError("a scope is printable ASCII without spaces, quotes or backslashes")
        return v

    @property
    def per_user(self) -> bool:
        """Whether each job names an end user's connection (else the service has one token)."""
        return False


class OAuth2ClientCredentials(TokenAuth):
    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: RequiredSecret
    scopes: tuple[str, ...] = ()
    #: Sent as ``audience`` (Auth0, Okta and others ask for it).
    audience: str | None = None
    #: How the client authenticates at the token endpoint: HTTP Basic (RFC 6749 2.3.1) or in the body.
    client_auth: ClientAuth = "basic"
    #: RFC 7009 revocation endpoint, if the provider has one.
    revoke_url: str | None = None


class OAuth2(TokenAuth):
    """Authorization code with PKCE: each end user authorizes once (``integrations connections
    add``), and each job names the user's connection."""

    type: Literal["oauth2"]
    authorize_url: str
    token_url: str
    revoke_url: str | None = None
    client_id: str = Field(min_length=1)
    #: None for a public client (PKCE alone).
    client_secret: Secret | None = None
    scopes: tuple[str, ...] = ()
    #: Added to the authorization URL, e.g. Google's ``access_type: offline``, ``prompt: consent``.
    authorize_params: dict[str, str] = Field(default_factory=dict)
    client_auth: ClientAuth = "basic"
    #: The redirect URI registered with the provider (default: OAUTH_REDIRECT_URL).
    redirect_url: str | None = None

    @field_validator("authorize_params")
    @classmethod
    def _own_params(cls, v: dict[str, str]) -> dict[str, str]:
        ours = {"response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge"}
        if ours & set(v) or "code_challenge_method" in v:
            raise ValueError("the flow sets response_type, client_id, redirect_uri, scope, state and PKCE")
        return {str(k): str(x) for k, x in v.items()}

    @property
    def per_user(self) -> bool:
        return True


class OAuth2JwtBearer(TokenAuth):
    """RFC 7523: a JWT signed with ``private_key`` (PEM) is the grant. With
    ``subject_from_connection`` each connection names the subject the token acts for
    (``connections add SERVICE NAME --subject alice@example.com``)."""

    type: Literal["oauth2_jwt_bearer"]
    token_url: str
    #: ``iss``: the client (a Google service account's e-mail address).
    issuer: str = Field(min_length=1)
    private_key: RequiredSecret
    key_id: str | None = None
    algorithm: Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"] = "RS256"
    #: ``aud`` (default: the token URL).
    audience: str | None = None
    #: ``sub``: whom the token acts for when it is the same for every job.
    subject: str | None = None
    subject_from_connection: bool = False
    scopes: tuple[str, ...] = ()
    #: Seconds the assertion is valid (Google allows at most an hour).
    assertion_lifetime: int = Field(3600, ge=30, le=3600)

    @property
    def per_user(self) -> bool:
        return self.subject_from_connection


class GithubApp(TokenAuth):
    """A GitHub App: installation tokens (an hour each) from a JWT signed with the app's key.
    Without ``installation_id`` each connection is an installation (``--subject <id>``)."""

    type: Literal["github_app"]
    #: The app's ID or client ID (the JWT's ``iss``).
    app_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9.]+$")
    private_key: RequiredSecret
    installation_id: int | None = Field(None, ge=1)

    @property
    def per_user(self) -> bool:
        return self.installation_id is None
