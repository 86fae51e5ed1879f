"""One module per kind of external service, each with ``build_request(service, op, params)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from integrations.config import Operation, ServiceConfig
from integrations.http import Request
from integrations.services import github, rest

BuildRequest = Callable[[ServiceConfig, Operation, dict[str, Any]], Request]

KINDS: dict[str, BuildRequest] = {
    "rest": rest.build_request,
    "github": github.build_request,
}


def build_request(service: ServiceConfig, op: Operation, params: dict[str, Any]) -> Request:
    return KINDS[service.kind](service, op, params)
