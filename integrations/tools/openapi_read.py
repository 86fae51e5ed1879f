"""Reading an OpenAPI document and the files its ``$ref``s name, within bounds.

A document comes from outside (a vendor's site, a colleague), so reading it must not cost more
than its size says nor reach beyond it: at most :data:`MAX_BYTES` per file, at most
:data:`MAX_NODES` values once YAML's aliases are expanded (an alias bomb refused before
anything walks it), at most :data:`MAX_DEPTH` levels; ``$ref``s name only files in the
document's own folder (and below): never a URL, an absolute path or a path that climbs out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from integrations.errors import IntegrationError

MAX_BYTES = 32 * 1024 * 1024
MAX_NODES = 2_000_000
MAX_DEPTH = 256
#: Text in all, once aliases expand: an alias to one long string, used a thousand times, is
#: few values but much text to validate, convert and write.
MAX_TEXT = 64 * 1024 * 1024


class ImportFailed(IntegrationError):
    """The document cannot be imported (unreadable, invalid, or nothing in it to call)."""


def read_document(path: Path) -> Any:
    """A JSON or YAML file as data, within the bounds above."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ImportFailed(f"{path.name} is over {MAX_BYTES // (1024 * 1024)} MiB")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ImportFailed(f"cannot read {path.name} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ImportFailed(f"{path.name} is not UTF-8 text") from None
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except RecursionError:
        raise ImportFailed(f"{path.name} is nested too deeply") from None
    except (ValueError, yaml.YAMLError):
        raise ImportFailed(f"{path.name} is neither JSON nor YAML") from None
    _check_size(doc, path.name)
    return doc


def _check_size(doc: Any, name: str) -> None:
    """Walk ``doc`` as its readers will, aliases expanded, stopping at the first bound crossed."""
    count = text = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ImportFailed(f"{name} expands to over {MAX_NODES:,} values (YAML aliases?)")
        if isinstance(node, str):
            text += len(node)
            if text > MAX_TEXT:
                raise ImportFailed(
                    f"{name} expands to over {MAX_TEXT // (1024 * 1024)} MiB of text (YAML aliases?)"
                )
        if depth > MAX_DEPTH:
            raise ImportFailed(f"{name} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def ref_file(ref: str, base: Path, root: Path) -> Path | None:
    """The file a ``$ref`` names, relative to file ``base`` (``None``: this file); refused
    unless it is a relative path inside ``root``, the document's folder."""
    file_part = ref.partition("#")[0]
    if not file_part:
        return None
    if urlsplit(file_part).scheme or file_part.startswith(("/", "\\")):
        raise ImportFailed("a $ref names a URL or an absolute path: only files beside the document are read")
    where = (base.parent / unquote(file_part)).resolve()
    if not where.is_relative_to(root):
        raise ImportFailed("a $ref names a file outside the document's folder")
    return where


def check_refs(doc: Any, path: Path) -> None:
    """Refuse a document any of whose ``$ref``s, or those of the files they name, goes beyond
    the document's folder, before a validator follows them."""
    base = path.resolve()
    root = base.parent
    seen = {base}
    todo: list[tuple[Any, Path]] = [(doc, base)]
    while todo:
        node, where = todo.pop()
        for ref in _refs(node):
            target = ref_file(ref, where, root)
            if target is not None and target not in seen:
                seen.add(target)
                if not target.is_file():
                    raise ImportFailed("$ref to a file that is not there")
                todo.append((read_document(target), target))


def _refs(node: Any) -> Iterator[str]:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            ref = n.get("$ref")
            if isinstance(ref, str):
                yield ref
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
