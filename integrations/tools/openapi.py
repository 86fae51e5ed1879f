"""An OpenAPI 3.0 / 3.1 or Swagger 2.0 document as a ``rest`` service of the services file.

One operation per path and method, named by its ``operationId`` (snake_cased, made unique) or
by method and path. Path, query and header parameters keep their JSON Schemas whole, with
their ``style`` and ``explode``; a JSON, ``application/x-www-form-urlencoded`` or
``multipart/form-data`` request body is the one parameter ``body`` with its whole schema. Auth
comes from ``securitySchemes`` (bearer, basic, API key in a header or the query; OAuth 2 and
OpenID Connect as a bearer token set from outside) with ``${SERVICE_...}`` placeholders.
What cannot be expressed is listed with the reason (:attr:`Imported.skipped`), never dropped
silently. Reading, validation and schemas: :mod:`integrations.tools.openapi_schema`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from integrations.config.schema import check_url
from integrations.tools.openapi_parts import Skip, operation_v2, operation_v3
from integrations.tools.openapi_read import check_refs
from integrations.tools.openapi_schema import ImportFailed, Resolver, read_document, validate_document

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


@dataclass
class Imported:
    name: str
    source: str
    title: str
    version: str
    service: dict[str, Any]
    #: ``(operation, reason)`` of each operation that could not be imported.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: What was left out of an imported operation (an optional cookie parameter...).
    notes: list[str] = field(default_factory=list)
    #: The environment variables the service needs, with what each holds.
    env: list[str] = field(default_factory=list)
    #: Operations left out by --tag / --operation.
    excluded: int = 0


def snake(text: str) -> str:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()
    return s if s and not s[0].isdigit() else f"op_{s}"


def import_openapi(
    path: Path,
    service: str,
    *,
    base_url: str | None = None,
    tags: tuple[str, ...] = (),
    operations: tuple[str, ...] = (),
    allow_private_network: bool = False,
) -> Imported:
    """Read, validate and convert the document at ``path`` (see the module). Raises
    :class:`ImportFailed` for an unreadable or invalid document, or one with nothing to import."""
    try:
        return _import(path, service, base_url, tags, operations, allow_private_network)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError) as e:
        # A shape the validator lets through (or does not look at) and the converter cannot take.
        raise ImportFailed(
            f"{path.name}: cannot convert the document ({type(e).__name__} in a part the validator "
            "does not check)"
        ) from None


def _import(
    path: Path,
    service: str,
    base_url: str | None,
    tags: tuple[str, ...],
    operations: tuple[str, ...],
    allow_private_network: bool,
) -> Imported:
    doc = read_document(path)
    if not isinstance(doc, dict):
        raise ImportFailed(f"{path.name} is not an OpenAPI document")
    check_refs(doc, path)
    version = validate_document(doc, path)
    r = Resolver(doc, path, version)
    info = doc.get("info") or {}
    out = Imported(
        service, path.name, str(info.get("title", "")), str(doc.get("openapi") or doc.get("swagger")), {}
    )
    url = (base_url or server_url(doc, version)).rstrip("/")
    try:
        check_url(url, what="the base URL")
    except ValueError as e:
        raise ImportFailed(f"{e}; give --base-url") from None
    auth = security(doc, version, service, r, out)
    ops: dict[str, Any] = {}
    for template, raw_item in (doc.get("paths") or {}).items():
        item, base = r.deref(raw_item)
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            op_id = str(op.get("operationId") or "")
            label = f"{method.upper()} {template}" + (f" ({op_id})" if op_id else "")
            if (tags and not set(op.get("tags") or ()) & set(tags)) or (
                operations and op_id not in operations and snake(op_id) not in operations
            ):
                out.excluded += 1
                continue
            try:
                build = operation_v2 if version == "2.0" else operation_v3
                spec = _defused(build(r, doc, template, item, method, op, base, out.notes, label))
                _loads(spec)
            except Skip as e:
                out.skipped.append((label, str(e)))
                continue
            name = snake(op_id) if op_id else snake(f"{method}_{template}")
            while name in ops:
                name = re.sub(r"(_\d+)?$", lambda m: f"_{int(m.group(0)[1:] or 1) + 1}", name, count=1)
            ops[name] = spec
    for hook, raw_item in (doc.get("webhooks") or {}).items():
        item, _ = r.deref(raw_item)
        for method in METHODS:
            if isinstance(item.get(method), dict):
                reason = "a webhook: the API calls its subscribers; receive it with a webhooks: source"
                out.skipped.append((f"webhook {hook} ({method.upper()})", reason))
    if not ops:
        why = "; ".join(f"{w}: {reason}" for w, reason in out.skipped[:5])
        raise ImportFailed(f"{path.name}: no operation to import" + (f" ({why})" if why else ""))
    description = " ".join(str(info.get("description") or "").split("\n\n")[0].split())[:500]
    out.service = {
        "description": (f"{out.title}. {description}" if description else out.title).replace("${", "$ {"),
        "base_url": url,
        **({"auth": auth} if auth else {}),
        **({"allow_private_network": True} if allow_private_network else {}),
        "operations": ops,
    }
    return out


def _loads(spec: dict[str, Any]) -> None:
    from integrations.services.rest import RestOperation

    try:
        RestOperation.model_validate(spec)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Skip(f"does not fit a rest operation ({where}: {first['msg'][:160]})") from None


def _defused(node: Any, key: str = "") -> Any:
    """``node`` with no ``${...}`` the services file would read as a variable: descriptions get
    ``$ {``; anywhere else the operation is skipped."""
    if isinstance(node, dict):
        return {k: _defused(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_defused(v, key) for v in node]
    if isinstance(node, str) and _ENV_REF.search(node):
        if key == "description":
            return node.replace("${", "$ {")
        raise Skip("holds '${...}', which the services file would read as an environment variable")
    return node


def server_url(doc: dict[str, Any], version: str) -> str:
    """The base URL the document gives (its first server, variables at their defaults)."""
    if version == "2.0":
        if not doc.get("host"):
            raise ImportFailed("the document names no host; give --base-url")
        schemes = doc.get("schemes") or ["https"]
        scheme = "https" if "https" in schemes else str(schemes[0])
        return f"{scheme}://{doc['host']}{doc.get('basePath') or ''}"
    servers = doc.get("servers")
    if not servers:
        raise ImportFailed("the document names no server; give --base-url")
    server = servers[0]
    variables = server.get("variables") or {}
    url = re.sub(
        r"\{([^}]+)\}", lambda m: str((variables.get(m.group(1)) or {}).get("default", "")), server["url"]
    )
    if not url.startswith(("http://", "https://")):
        raise ImportFailed("the document's server URL is relative; give --base-url")
    return url


def security(
    doc: dict[str, Any], version: str, service: str, r: Resolver, out: Imported
) -> dict[str, Any] | None:
    """The service's ``auth:`` from the document's security schemes (the globally required one,
    else the one most operations require); the variables it needs go to ``out.env``."""
    schemes = (
        doc.get("securityDefinitions")
        if version == "2.0"
        else (doc.get("components") or {}).get("securitySchemes")
    ) or {}
    used: Counter[str] = Counter()
    for req in doc.get("security") or []:
        used.update({name: 1000 for name in req})
    for raw_item in (doc.get("paths") or {}).values():
        item, _ = r.deref(raw_item)
        for method in METHODS:
            for req in (
                (item.get(method) or {}).get("security") or [] if isinstance(item.get(method), dict) else []
            ):
                used.update(req.keys())
    prefix = re.sub(r"[^A-Z0-9]", "_", service.upper())
    for name, _ in used.most_common():
        scheme, _ = r.deref(schemes.get(name))
        auth = _auth(scheme, prefix) if isinstance(scheme, dict) else None
        if auth is None:
            continue
        for key, value in auth.items():
            if isinstance(value, str) and value.startswith("${"):
                out.env.append(f"{value[2:-1]}: the {key} of security scheme {name!r} ({scheme.get('type')})")
        if scheme.get("type") in ("oauth2", "openIdConnect"):
            out.notes.append(
                f"security scheme {name!r} is {scheme['type']}: set the access token (not refreshed here)"
            )
        others = sorted(set(used) - {name})
        if others:
            out.notes.append(
                f"auth is {name!r}; operations that require {', '.join(others)} instead get it too"
            )
        return auth
    if used:
        out.notes.append(
            f"no security scheme of the document is supported ({', '.join(sorted(used))}): no auth"
        )
    return None


def _auth(scheme: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    kind = scheme.get("type")
    if (kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer") or kind in (
        "oauth2",
        "openIdConnect",
    ):
        return {"type": "bearer", "token": f"${{{prefix}_TOKEN}}"}
    if (kind == "http" and str(scheme.get("scheme", "")).lower() == "basic") or kind == "basic":
        return {"type": "basic", "username": f"${{{prefix}_USERNAME}}", "password": f"${{{prefix}_PASSWORD}}"}
    if kind == "apiKey" and scheme.get("in") in ("header", "query"):
        return {
            "type": "api_key",
            "in": scheme["in"],
            "name": scheme["name"],
            "key": f"${{{prefix}_API_KEY}}",
        }
    return None
