"""Reading an OpenAPI document: the file and those its ``$ref``s name, validation, and its
schemas as JSON Schema 2020-12 with every reference resolved.

- OpenAPI 3.1 schemas are JSON Schema 2020-12 already; OpenAPI 3.0 and Swagger 2.0 schemas
  are converted: ``nullable: true`` adds ``null`` to the type, a boolean ``exclusiveMinimum``
  / ``exclusiveMaximum`` becomes the number, ``example`` becomes ``examples``, ``type: file``
  and ``format: binary`` / ``byte`` become base64 strings (``contentEncoding: base64``);
- ``discriminator``, ``xml``, ``externalDocs`` and ``x-`` extensions are left out;
- references (``#/components/...``, ``other.yaml#/...``) are inlined; a schema that refers to
  itself, however indirectly, goes to the parameters' ``$defs`` once and is referred to there.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from integrations.tools.openapi_read import ImportFailed, read_document, ref_file

__all__ = ["ImportFailed", "Resolver", "read_document", "validate_document"]

DROP = ("discriminator", "xml", "externalDocs")
#: Keywords whose value is a schema, and those whose value is a list or a mapping of schemas.
ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def validate_document(doc: dict[str, Any], path: Path) -> str:
    """Check ``doc`` with openapi-spec-validator; return its version (``2.0``, ``3.0``, ``3.1``)."""
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    version = str(doc.get("openapi") or doc.get("swagger") or "")
    major = "2.0" if version.startswith("2.") else version[:3]
    if major not in ("2.0", "3.0", "3.1"):
        raise ImportFailed(f"{path.name}: not an OpenAPI 3.0 / 3.1 or Swagger 2.0 document")
    try:
        validate(doc, base_uri=path.resolve().as_uri())
    except OpenAPIValidationError as e:
        where = "/".join(str(p) for p in getattr(e, "absolute_path", ())) or "document"
        message = str(getattr(e, "message", e))
        instance = getattr(e, "instance", None)
        if instance is not None and repr(instance) in message:
            message = message.replace(repr(instance), "the value")  # never the document's text
        message = message.splitlines()[0][:200]
        raise ImportFailed(f"{path.name} is not a valid OpenAPI document ({where}: {message})") from None
    return major


class Resolver:
    """References of one document (and the files it names) resolved, schemas converted."""

    def __init__(self, doc: dict[str, Any], path: Path, version: str) -> None:
        self.base = path.resolve()
        self.docs: dict[Path, Any] = {self.base: doc}
        self.version = version
        #: Converted schemas by reference, with the ``$defs`` names each needs.
        self._done: dict[str, tuple[dict[str, Any], frozenset[str]]] = {}
        self._stack: list[str] = []
        self._recursive: set[str] = set()
        #: Schemas that refer to themselves, by ``$defs`` name.
        self.defs: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}
        self.needed: set[str] = set()

    # ---- references ------------------------------------------------------------------------

    def target(self, ref: str, base: Path) -> tuple[Any, Path, str]:
        """What ``ref`` (relative to file ``base``) points at, the file it is in, and its key."""
        pointer = ref.partition("#")[2]
        where = ref_file(ref, base, self.base.parent) or base
        if where not in self.docs:
            if not where.is_file():
                raise ImportFailed("$ref to a file that is not there")
            self.docs[where] = read_document(where)
        node = self.docs[where]
        for part in [p for p in pointer.split("/") if p]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ImportFailed(f"$ref #{pointer[:120]} points at nothing") from None
        return node, where, f"{where}#{pointer}"

    def deref(self, node: Any, base: Path | None = None) -> tuple[Any, Path]:
        """A parameter, request body, path item... with its ``$ref`` chain followed."""
        base = base or self.base
        for _ in range(32):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                return node, base
            node, base, _ = self.target(node["$ref"], base)
        raise ImportFailed("a $ref chain is too long (or loops)")

    # ---- schemas ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start an operation: its ``$defs`` are collected afresh."""
        self.needed = set()

    def defs_needed(self) -> dict[str, dict[str, Any]]:
        """The ``$defs`` the operation's schemas refer to, with those they refer to."""
        out: dict[str, dict[str, Any]] = {}
        todo = sorted(self.needed)
        while todo:
            name = todo.pop()
            if name not in out and name in self.defs:
                out[name] = self.defs[name]
                todo += sorted(_def_refs(self.defs[name]))
        return dict(sorted(out.items()))

    def schema(self, node: Any, base: Path | None = None) -> Any:
        """``node`` (a Schema Object) as JSON Schema 2020-12, references resolved."""
        base = base or self.base
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return {}
        if isinstance(node.get("$ref"), str):
            converted = self._ref(node["$ref"], base)
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            if siblings and self.version == "3.1":  # 3.1 allows keywords beside $ref
                return {"allOf": [converted], **self._convert(siblings, base)}
            return converted
        return self._convert(node, base)

    def _ref(self, ref: str, base: Path) -> dict[str, Any]:
        target, where, key = self.target(ref, base)
        if key in self._stack:
            self._recursive.add(key)
            name = self._def_name(key)
            self.needed.add(name)
            return {"$ref": f"#/$defs/{name}"}
        done = self._done.get(key)
        if done is not None:
            self.needed |= done[1]
            return copy.deepcopy(done[0])
        outer = self.needed
        self.needed = set()
        self._stack.append(key)
        try:
            converted = self.schema(target, where)
        finally:
            self._stack.pop()
        if key in self._recursive:
            name = self._def_name(key)
            self.defs[name] = converted
            self.needed.discard(name)
            converted = {"$ref": f"#/$defs/{name}"}
            self.needed.add(name)
        mine = frozenset(self.needed)
        self._done[key] = (converted, mine)
        self.needed = outer | mine
        return copy.deepcopy(converted)

    def _def_name(self, key: str) -> str:
        name = self._names.get(key)
        if name is None:
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", key.rpartition("/")[2]) or "schema"
            name = stem
            while name in self._names.values():
                name = f"{stem}_{len(self._names)}"
            self._names[key] = name
        return name

    def _convert(self, node: dict[str, Any], base: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.startswith("x-") or key in DROP:
                continue
            if key in ONE and isinstance(value, dict | bool):
                out[key] = self.schema(value, base)
            elif key in MANY and isinstance(value, list):
                out[key] = [self.schema(v, base) for v in value]
            elif key in NAMED and isinstance(value, dict):
                out["$defs" if key == "definitions" else key] = {
                    k: self.schema(v, base) for k, v in value.items()
                }
            elif key == "example":
                out.setdefault("examples", [value])
            else:
                out[key] = value
        if self.version != "3.1":
            _older(out)
        return out


def _older(out: dict[str, Any]) -> None:
    """OpenAPI 3.0 / Swagger 2.0 Schema Object keywords as JSON Schema 2020-12's."""
    for bound in ("Minimum", "Maximum"):
        flag = out.get(f"exclusive{bound}")
        if isinstance(flag, bool):
            del out[f"exclusive{bound}"]
            if flag and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
    if out.get("type") == "file" or out.get("format") in ("binary", "byte"):
        out["type"] = "string"
        out.pop("format", None)
        out["contentEncoding"] = "base64"
    if out.pop("nullable", False) is True:
        types = out.get("type")
        if isinstance(types, str):
            out["type"] = [types, "null"]
        elif types is None and any(k in out for k in ("allOf", "anyOf", "oneOf", "enum")):
            inner = {k: out.pop(k) for k in ("allOf", "anyOf", "oneOf") if k in out}
            out["anyOf"] = [inner, {"type": "null"}] if inner else out.get("anyOf", [])
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]


def _def_refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref[len("#/$defs/") :])
        for v in node.values():
            found |= _def_refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _def_refs(v)
    return found
