"""GitHub's REST API: REST plus the media type and API version GitHub asks clients to send.

https://docs.github.com/en/rest/about-the-rest-api/api-versions
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from integrations.config import Operation, ServiceConfig
from integrations.http import Request
from integrations.services import rest

HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


def build_request(service: ServiceConfig, op: Operation, params: dict[str, Any]) -> Request:
    req = rest.build_request(service, op, params)
    return replace(req, headers={**HEADERS, **req.headers})
