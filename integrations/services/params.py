"""An operation's parameters as a JSON Schema (2020-12): the one contract that validates a
job's params at submit and that LLM tools are built from.

The services file may give a parameter's type in short (``str``, ``int | None``, ...) or as a
JSON Schema of its own (``{type: string, enum: [open, closed], description: ...}``).

Validation is lenient on input and strict on output: a number given as a string (``"5"``) for
an ``integer`` is coerced, as is a number for a ``string``; then the value must match the schema.
Error messages name the parameter and the rule, never the value given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from integrations.errors import InvalidParams

SHORT_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "list": {"type": "array"},
    "dict": {"type": "object"},
    "any": {},
}


def field(spec: str | Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A parameter's ``(schema, required)`` from its short form or its own schema.

    ``"str | None"`` is an optional string; a schema is required unless it has a ``default``
    or says ``required: false``. Raises ``ValueError`` naming what is wrong (not the value);
    the schema itself is checked once, as part of the operation's (:class:`Params`).
    """
    schema, required, _ = spec_of(spec)
    return schema, required


def spec_of(
    spec: str | Mapping[str, Any], own: tuple[str, ...] = ()
) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """:func:`field`, also returning the keys of ours named in ``own`` (a query parameter's
    ``name``, ``style``, ``explode``) as ``(schema, required, {key: value})``.

    ``required: true|false`` is always ours; a *list* under ``required`` is JSON Schema's (the
    required properties of an object parameter), and leaves the default rule in force. The
    long form, like OpenAPI's Parameter Object, keeps the two apart: ``{schema: {...},
    required: false, description: ...}`` plus the keys in ``own``."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("|")]
        optional = "None" in parts
        names = [p for p in parts if p != "None"]
        if not names or any(n not in SHORT_TYPES for n in names):
            raise ValueError(f"unknown type; use one of {', '.join(SHORT_TYPES)}, optionally '| None'")
        if "any" in names:
            return {}, not optional, {}
        types = [SHORT_TYPES[n]["type"] for n in names]
        return {"type": types[0] if len(types) == 1 else types}, not optional, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("schema"), Mapping):
        extra = sorted(set(spec) - {"schema", "required", "description", *own})
        if extra:
            raise ValueError(f"beside schema: a parameter has only required, description, {', '.join(own)}")
        schema = dict(spec["schema"])
        if isinstance(spec.get("description"), str):
            schema["description"] = spec["description"]
        flag = spec.get("required", "default" not in schema)
        if not isinstance(flag, bool):
            raise ValueError("required: must be true or false")
        return schema, flag, {k: spec[k] for k in own if k in spec}
    if isinstance(spec, Mapping):
        flag = spec.get("required")
        ours = {k: spec[k] for k in own if k in spec}
        schema = {
            k: v
            for k, v in spec.items()
            if k not in own and not (k == "required" and not isinstance(v, list))
        }
        required = flag if flag is not None and not isinstance(flag, list) else "default" not in spec
        if not isinstance(required, bool):
            raise ValueError("required: must be true or false")
        return schema, required, ours
    raise ValueError("a parameter is a type name (str, int, ...) or a JSON Schema mapping")


def object_schema(
    properties: Mapping[str, dict[str, Any]], required: list[str], description: str = ""
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties), "additionalProperties": False}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def check_schema(schema: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming where ``schema`` breaks JSON Schema 2020-12's meta-schema.

    Each property's schema is checked on its own and the verdict remembered: operations of one
    API share most of them, and the meta-schema check is the slow part of loading a services
    file with hundreds of imported operations."""
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not props:
        problem = _problem(json.dumps(schema, sort_keys=True, default=str))
        if problem:
            raise ValueError(f"not a valid JSON Schema ({problem})")
        return
    check_schema({**schema, "properties": {}})
    for name, sub in props.items():
        problem = _problem(json.dumps(sub, sort_keys=True, default=str))
        if problem:
            raise ValueError(f"not a valid JSON Schema (properties/{name}/{problem})")


@functools.lru_cache(maxsize=8192)
def _problem(text: str) -> str | None:
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "schema"
        return f"{where}: {e.validator} is wrong"
    return None


class Params:
    """A compiled parameters schema: :meth:`validate` returns the params as they will be sent."""

    def __init__(self, schema: dict[str, Any]) -> None:
        check_schema(schema)
        self.schema = schema
        self._validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)

    def validate(self, params: Any) -> dict[str, Any]:
        """Coerce and check ``params``; raise :class:`InvalidParams` naming each problem."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("params must be a mapping of names to values")
        required = set(self.schema.get("required", ()))
        # An optional parameter given as None is the same as one left out.
        clean = {k: v for k, v in params.items() if v is not None or k in required}
        clean = dict(coerce(clean, self.schema))
        errors = sorted(self._validator.iter_errors(clean), key=lambda e: list(e.absolute_path))
        if errors:
            raise InvalidParams("; ".join(_describe(e) for e in errors[:5]))
        return dict(clean)


#: What is kept of a ``writeOnly`` value once its job is settled.
DROPPED = "$dropped"


def drop_write_only(value: Any, schema: Mapping[str, Any]) -> tuple[Any, bool]:
    """``value`` with every part its schema marks ``writeOnly`` (a message's body, a file's
    content) replaced by its digest, and whether anything was: the ledger keeps what a job was
    asked, not what it carried."""
    if schema.get("writeOnly") is True and value is not None:
        data = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        digest = hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()
        return {DROPPED: {"sha256": digest, "chars": len(data)}}, True
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        props, out, changed = schema["properties"], {}, False
        for k, v in value.items():
            out[k], hit = drop_write_only(v, props[k]) if isinstance(props.get(k), dict) else (v, False)
            changed |= hit
        return out, changed
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        pairs = [drop_write_only(v, schema["items"]) for v in value]
        return [v for v, _ in pairs], any(hit for _, hit in pairs)
    return value, False


def has_dropped(value: Any) -> bool:
    if isinstance(value, dict):
        return DROPPED in value or any(has_dropped(v) for v in value.values())
    if isinstance(value, list):
        return any(has_dropped(v) for v in value)
    return False


def coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Numbers and booleans given as strings, and numbers given for strings, made what the
    schema asks; everything else as given."""
    types = schema.get("type")
    allowed = set(types) if isinstance(types, list) else {types} if isinstance(types, str) else set()
    if isinstance(value, dict):
        props = schema.get("properties")
        if isinstance(props, dict):
            return {k: coerce(v, props[k]) if isinstance(props.get(k), dict) else v for k, v in value.items()}
        return value
    if isinstance(value, list):
        items = schema.get("items")
        return [coerce(v, items) for v in value] if isinstance(items, dict) else value
    if isinstance(value, str) and allowed and "string" not in allowed:
        text = value.strip()
        if "integer" in allowed:
            try:
                return int(text)
            except ValueError:
                pass
        if "number" in allowed:
            try:
                number = float(text)
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
        if "boolean" in allowed and text.lower() in ("true", "false"):
            return text.lower() == "true"
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and allowed == {"string"}:
        return str(value)
    return value


def _describe(e: ValidationError) -> str:
    """One problem, named by its place in the params and the rule, without the value."""
    # Keys come from the caller: named, but cut short.
    where = ".".join(str(p)[:40] for p in e.absolute_path)
    rule: str = str(e.validator)
    expected: Any = e.validator_value
    if rule == "required":
        missing = [name for name in expected if isinstance(e.instance, dict) and name not in e.instance]
        return "; ".join(f"{_join(where, name)}: required" for name in missing) or f"{where}: required"
    if rule == "additionalProperties":
        known = set((e.schema.get("properties") or {}).keys()) if isinstance(e.schema, dict) else set()
        extra = [str(k)[:40] for k in e.instance if k not in known] if isinstance(e.instance, dict) else []
        return "; ".join(f"{_join(where, k)}: not a parameter of this operation" for k in extra)
    if rule == "type":
        kinds = expected if isinstance(expected, list) else [expected]
        words = [_TYPE_WORDS.get(str(k), str(k)) for k in kinds]
        return f"{where or 'params'}: must be {' or '.join(words)}"
    if rule == "enum":
        return f"{where}: must be one of {', '.join(json.dumps(v) for v in expected)}"
    if rule in ("const",):
        return f"{where}: must be {json.dumps(expected)}"
    if rule in ("anyOf", "oneOf"):
        return f"{where}: matches none of the allowed forms"
    if rule == "format":
        return f"{where}: must be a valid {expected}"
    return f"{where or 'params'}: fails {rule} {json.dumps(expected)[:80]}"


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
