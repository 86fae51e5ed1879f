"""The user's side of the authorization-code flow, for the connection tests: a script acting as
the browser, logged in at the test OAuth server (tests/oauth_server.py) by a cookie."""

from __future__ import annotations

import requests

from integrations.auth import authorize
from integrations.services import get_services


def browse(url: str, user: str, deny: bool = False) -> requests.Response:
    """Open the authorization URL as ``user`` (who consents unless ``deny``), follow the
    provider's redirect back to the receiver's callback, and return the page shown there."""
    cookie = f"user={user}" + ("; consent=deny" if deny else "")
    at_provider = requests.get(url, headers={"Cookie": cookie}, allow_redirects=False, timeout=10)
    assert at_provider.status_code == 302, at_provider.text
    return requests.get(at_provider.headers["Location"], timeout=20)


def connect(service: str, name: str, user: str) -> None:
    """Authorize connection ``name`` of ``service`` as ``user``, start to end."""
    page = browse(authorize.start(get_services()[service], name), user)
    assert page.status_code == 200, page.text
