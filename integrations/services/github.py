"""GitHub's REST API: REST plus the media type and API version GitHub asks clients to send.

https://docs.github.com/en/rest/about-the-rest-api/api-versions
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from integrations import http
from integrations.services.base import Attempt, Operation
from integrations.services.rest import RestService

HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


class GithubService(RestService):
    kind: Literal["github"] = "github"  # type: ignore[assignment]

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        req = super().request(op, params, attempt)
        return replace(req, headers={**HEADERS, **req.headers})
