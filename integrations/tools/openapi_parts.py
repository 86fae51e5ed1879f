"""One OpenAPI operation as a ``rest`` operation's spec: its parameters and its request body.

OpenAPI 3.x: https://spec.openapis.org/oas/v3.1.0#operation-object; Swagger 2.0 (its
``collectionFormat``, ``formData`` and ``body`` parameters):
https://swagger.io/specification/v2/#parameter-object
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from integrations.services.rest import BODY, STYLES
from integrations.tools.openapi_schema import Resolver

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
#: Header parameters OpenAPI says to ignore (the request's own machinery sets them).
IGNORED_HEADERS = ("accept", "content-type", "authorization")
#: Swagger 2.0's collectionFormat as OpenAPI 3's (style, explode).
COLLECTION = {
    "csv": ("form", False),
    "multi": ("form", True),
    "ssv": ("spaceDelimited", False),
    "pipes": ("pipeDelimited", False),
}


class Skip(Exception):
    """This operation cannot be expressed; the message says why."""


def describe(op: dict[str, Any]) -> str:
    parts = [str(op[k]).strip() for k in ("summary", "description") if op.get(k)]
    text = "\n\n".join(dict.fromkeys(p for p in parts if p))
    return f"Deprecated. {text}".strip() if op.get("deprecated") else text


def _start(method: str, template: str, op: dict[str, Any]) -> dict[str, Any]:
    text = describe(op)
    return {**({"description": text} if text else {}), "method": method.upper(), "path": template}


def _merged(r: Resolver, item: dict[str, Any], op: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """The operation's parameters with the path item's, the operation's winning (by name and in)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in [*(item.get("parameters") or []), *(op.get("parameters") or [])]:
        p, _ = r.deref(raw, base)
        found[(str(p.get("name")), str(p.get("in")))] = p
    return list(found.values())


def _key(name: str, where: str, used: set[str], path: bool = False) -> str:
    """A parameter's key in params: its name where that is a valid key, else made one."""
    pattern = r"[^A-Za-z0-9_]" if path else r"[^A-Za-z0-9_.-]"
    key = re.sub(pattern, "_", name)[:60] or "param"
    if path and not re.match(r"[A-Za-z_]", key):
        key = f"p_{key}"
    if key in used:
        key = f"{key}_{where}"
    while key in used:
        key += "_"
    used.add(key)
    return key


def _with(schema: Any, p: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema) if isinstance(schema, dict) else {}
    if p.get("description"):
        out["description"] = str(p["description"])
    if p.get("deprecated"):
        out["deprecated"] = True
    if "example" in p:
        out.setdefault("examples", [p["example"]])
    return out


def _leave_out(p: dict[str, Any], why: str, notes: list[str], label: str) -> None:
    """An optional parameter we cannot send is left out (and said so); a required one stops the import."""
    if p.get("required"):
        raise Skip(f"required {p.get('in')} parameter {p.get('name')!r}: {why}")
    notes.append(f"{label}: optional {p.get('in')} parameter {p.get('name')!r} left out ({why})")


def _add(
    spec: dict[str, Any],
    where: str,
    p: dict[str, Any],
    schema: dict[str, Any],
    used: set[str],
    style: str,
    explode: bool,
) -> None:
    name = str(p["name"])
    if where == "path":
        key = _key(name, "path", used, path=True)
        spec["path"] = spec["path"].replace("{" + name + "}", "{" + key + "}")
        spec.setdefault("path_params", {})[key] = schema
        return
    key = _key(name, where, used)
    entry: dict[str, Any] = {"schema": schema, "required": bool(p.get("required"))}
    if key != name:
        entry["name"] = name
    if where == "query":
        if style != "form":
            entry["style"] = style
        if explode != (style == "form"):
            entry["explode"] = explode
    spec.setdefault("query" if where == "query" else "headers", {})[key] = entry


def _parameter(
    spec: dict[str, Any],
    p: dict[str, Any],
    schema: dict[str, Any],
    style: str,
    explode: bool,
    used: set[str],
    notes: list[str],
    label: str,
) -> None:
    where = p.get("in")
    if where == "header" and str(p.get("name", "")).lower() in IGNORED_HEADERS:
        return
    if where == "cookie":
        _leave_out(p, "cookies are not sent", notes, label)
    elif where == "path" and style != "simple":
        raise Skip(f"path parameter {p.get('name')!r} has style {style}; only simple is supported")
    elif (where == "header" and style != "simple") or (where == "query" and style not in STYLES):
        _leave_out(p, f"style {style} is not supported", notes, label)
    elif where in ("path", "query", "header"):
        _add(spec, str(where), p, schema, used, style, explode)


def _media(content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The request body's media type we send (JSON first, then the forms) and its entry."""
    by_type = {str(k).split(";")[0].strip().lower(): v for k, v in content.items()}
    for mt, entry in by_type.items():
        if mt == "application/json" or mt.endswith("+json"):
            return "application/json", entry or {}
    for mt in FORMS:
        if mt in by_type:
            return mt, by_type[mt] or {}
    return None


def operation_v3(
    r: Resolver,
    doc: dict[str, Any],
    template: str,
    item: dict[str, Any],
    method: str,
    op: dict[str, Any],
    base: Path,
    notes: list[str],
    label: str,
) -> dict[str, Any]:
    if op.get("servers") or item.get("servers"):
        raise Skip("it has servers of its own (the service has one base URL)")
    r.begin()
    spec = _start(method, template, op)
    used: set[str] = set()
    if op.get("requestBody") is not None:
        used.add(BODY)
        _body_v3(r, spec, op["requestBody"], base, notes, label)
    for p in _merged(r, item, op, base):
        if "schema" not in p:
            _leave_out(p, "described by content, not schema", notes, label)
            continue
        where = p.get("in")
        style = str(p.get("style") or ("form" if where in ("query", "cookie") else "simple"))
        explode = bool(p.get("explode", style == "form"))
        _parameter(spec, p, _with(r.schema(p["schema"], base), p), style, explode, used, notes, label)
    if method == "trace":
        raise Skip("TRACE is not a method rest operations send")
    defs = r.defs_needed()
    if defs:
        spec["defs"] = defs
    return spec


def _body_v3(r: Resolver, spec: dict[str, Any], raw: Any, base: Path, notes: list[str], label: str) -> None:
    body, where = r.deref(raw, base)
    picked = _media(body.get("content") or {})
    if picked is None:
        types = ", ".join(sorted(body.get("content") or {})) or "no media type"
        if body.get("required"):
            raise Skip(f"its request body is only {types}")
        notes.append(f"{label}: optional request body left out (only {types})")
        return
    media, entry = picked
    schema = r.schema(entry.get("schema") or {}, where)
    if isinstance(schema, dict) and body.get("description") and "description" not in schema:
        schema = {**schema, "description": str(body["description"])}
    spec["body_schema"] = {
        "schema": schema if isinstance(schema, dict) else {},
        "required": bool(body.get("required")),
    }
    if media != "application/json":
        spec["content_type"] = media


def operation_v2(
    r: Resolver,
    doc: dict[str, Any],
    template: str,
    item: dict[str, Any],
    method: str,
    op: dict[str, Any],
    base: Path,
    notes: list[str],
    label: str,
) -> dict[str, Any]:
    r.begin()
    spec = _start(method, template, op)
    used: set[str] = set()
    params = _merged(r, item, op, base)
    consumes = [
        str(c).split(";")[0].lower()
        for c in op.get("consumes") or doc.get("consumes") or ["application/json"]
    ]
    form: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    if any(p.get("in") in ("body", "formData") for p in params):
        used.add(BODY)
    for p in params:
        where = p.get("in")
        if where == "body":
            if not any(c == "application/json" or c.endswith("+json") for c in consumes):
                raise Skip(f"its body is only {', '.join(consumes)}")
            schema = _with(r.schema(p.get("schema") or {}, base), p)
            spec["body_schema"] = {"schema": schema, "required": bool(p.get("required"))}
            continue
        fields = {
            k: v
            for k, v in p.items()
            if k not in ("name", "in", "description", "required", "collectionFormat", "allowEmptyValue")
            and not k.startswith("x-")
        }
        schema = _with(r.schema(fields, base), p)
        if where == "formData":
            form["properties"][str(p["name"])] = schema
            if p.get("required"):
                form["required"].append(str(p["name"]))
            continue
        fmt = str(p.get("collectionFormat") or "csv")
        if fmt not in COLLECTION or (fmt != "csv" and where != "query"):
            _leave_out(p, f"collectionFormat {fmt} is not supported", notes, label)
            continue
        style, explode = COLLECTION[fmt] if where == "query" else ("simple", False)
        _parameter(spec, p, schema, style, explode, used, notes, label)
    if form["properties"]:
        files = any(s.get("contentEncoding") == "base64" for s in form["properties"].values())
        multipart = files or (consumes and consumes[0] == "multipart/form-data")
        spec["content_type"] = "multipart/form-data" if multipart else "application/x-www-form-urlencoded"
        spec["body_schema"] = {
            "schema": {k: v for k, v in form.items() if v},
            "required": bool(form["required"]),
        }
    defs = r.defs_needed()
    if defs:
        spec["defs"] = defs
    return spec
