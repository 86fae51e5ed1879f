"""Generic REST: the request is the operation's method and path, filled from validated params."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from integrations.config import Operation, ServiceConfig
from integrations.http import Request


def build_request(service: ServiceConfig, op: Operation, params: dict[str, Any]) -> Request:
    """``params`` are already validated: path values are quoted whole, the rest go to query or body."""
    path = op.path.format(**{name: quote(str(params[name]), safe="") for name in op.path_params})
    query = {k: params[k] for k in op.query if k in params}
    body = {k: params[k] for k in op.body if k in params} if op.body is not None else None
    return Request(op.method, service.base_url + path, params=query, json=body)
