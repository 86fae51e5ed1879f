"""Parameters schemas in OpenAI's strict-mode subset of JSON Schema (Structured Outputs, "Supported
schemas": https://platform.openai.com/docs/guides/structured-outputs#supported-schemas).

What :func:`strict_schema` changes, everywhere in the schema (``$defs`` included):

- every object gets ``additionalProperties: false`` and lists *every* property in ``required``;
  a property that was optional becomes nullable (``"type": ["string", "null"]``, ``null`` added
  to its ``enum``, or ``anyOf: [schema, {"type": "null"}]`` when it has no plain ``type``). A
  model then sends ``null`` for what it leaves out, and :func:`integrations.tools.calls.drop_nulls`
  removes those nulls again before the params are validated;
- ``oneOf`` becomes ``anyOf``; ``allOf`` of object schemas is merged into one object;
- kept as they are: ``type``, ``properties``, ``required``, ``items``, ``enum``, ``const``,
  ``anyOf``, ``$ref``, ``$defs``, ``description``, ``pattern``, ``format`` (date-time, time, date,
  duration, email, hostname, ipv4, ipv6, uuid), ``multipleOf``, ``minimum``, ``maximum``,
  ``exclusiveMinimum``, ``exclusiveMaximum``, ``minItems``, ``maxItems``;
- rules strict mode does not take (``minLength``, ``maxLength``, ``uniqueItems``, ``default``,
  ``examples``, ``minProperties``, ``maxProperties``, other formats, ``contentEncoding``,
  ``deprecated``, ``readOnly``, ``writeOnly``) are removed and stated in the description, so the
  model still reads them; the full schema still validates every call;
- ``title``, ``$schema``, ``$comment`` and unknown keywords are removed.

A schema strict mode cannot express (an object with no declared properties that takes any
keys, ``additionalProperties`` or ``patternProperties`` schemas, ``not``, ``if``/``then``/``else``,
``prefixItems``, an array without ``items``, a value of any type) gives ``None``: such a tool is
offered without ``strict``.
"""

from __future__ import annotations

import json
from typing import Any

KEEP = frozenset(
    {
        "type",
        "enum",
        "const",
        "description",
        "pattern",
        "multipleOf",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minItems",
        "maxItems",
        "$ref",
    }
)
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
NOTED = (
    "minLength",
    "maxLength",
    "uniqueItems",
    "default",
    "examples",
    "minProperties",
    "maxProperties",
    "contentEncoding",
    "contentMediaType",
    "deprecated",
    "readOnly",
    "writeOnly",
)
STRUCTURAL = (
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "dependentSchemas",
    "dependentRequired",
    "propertyNames",
    "prefixItems",
    "contains",
    "unevaluatedProperties",
    "unevaluatedItems",
)


class NotStrict(Exception):
    """This part of a schema has no strict-mode form."""


def strict_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    """``schema`` in the strict subset, or ``None`` when it has no such form (see the module)."""
    try:
        return _strict(schema)
    except NotStrict:
        return None


def _strict(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict) or not schema:
        raise NotStrict("a value of any type")
    s = _merge_all_of(schema) if "allOf" in schema else dict(schema)
    if "oneOf" in s:
        s["anyOf"] = s.pop("oneOf") + s.pop("anyOf", [])
    if any(k in s for k in STRUCTURAL):
        raise NotStrict("structural keyword")
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in s.items():
        if key in KEEP:
            out[key] = value
        elif key == "format":
            if value in FORMATS:
                out[key] = value
            else:
                notes.append(f"format: {value}")
        elif key in NOTED:
            notes.append(f"{key}: {json.dumps(value)[:200]}")
        elif key == "items":
            out[key] = _strict(value)
        elif key == "anyOf":
            out[key] = [_strict(v) for v in value]
        elif key == "$defs":
            out[key] = {name: _strict(v) for name, v in value.items()}
    types = s.get("type")
    kinds = set(types) if isinstance(types, list) else {types}
    if "object" in kinds or "properties" in s:
        _strict_object(s, out)
    if "array" in kinds and "items" not in s:
        raise NotStrict("an array of anything")
    if not any(k in out for k in ("type", "enum", "const", "anyOf", "$ref")):
        raise NotStrict("no type")
    if notes:
        text = out.get("description", "")
        out["description"] = f"{text} ({'; '.join(notes)})".strip()
    return out


def _strict_object(s: dict[str, Any], out: dict[str, Any]) -> None:
    props = s.get("properties") or {}
    extra = s.get("additionalProperties")
    if extra not in (None, False) or (not props and extra is None):
        raise NotStrict("an object that takes keys it does not declare")
    needed = set(s.get("required") or ())
    out["properties"] = {
        name: _strict(sub) if name in needed else nullable(_strict(sub)) for name, sub in props.items()
    }
    out["required"] = list(props)
    out["additionalProperties"] = False
    out.setdefault("type", "object")


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also takes ``null``."""
    types = schema.get("type")
    if types is None or "const" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    if isinstance(types, list):
        out["type"] = types if "null" in types else [*types, "null"]
    elif types != "null":
        out["type"] = [types, "null"]
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    """``allOf`` of object schemas (after inlining) as one object schema."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    props = dict(merged.get("properties") or {})
    required = list(merged.get("required") or [])
    for part in schema["allOf"]:
        if not isinstance(part, dict) or "$ref" in part:
            raise NotStrict("allOf of a reference")
        part = _merge_all_of(part) if "allOf" in part else part
        if part.get("type", "object") != "object":
            raise NotStrict("allOf of non-objects")
        for name, sub in (part.get("properties") or {}).items():
            if name in props and props[name] != sub:
                raise NotStrict("allOf with conflicting properties")
            props[name] = sub
        required += [r for r in part.get("required") or [] if r not in required]
        for key, value in part.items():
            if key not in ("properties", "required", "type"):
                merged.setdefault(key, value)
    merged.update(type="object", properties=props, required=required)
    return merged
