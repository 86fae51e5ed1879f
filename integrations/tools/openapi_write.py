"""An imported service written out: a complete services file, or added to an existing one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from integrations.config.loading import read_file
from integrations.errors import ConfigError
from integrations.tools.openapi import Imported
from integrations.tools.openapi_schema import ImportFailed


class _Dumper(yaml.SafeDumper):
    """No anchors and aliases: every schema written out where it is used."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text_block(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = (
        "|"
        if "\n" in text and all(c.isprintable() or c == "\n" for c in text) and not text.endswith(" ")
        else None
    )
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text_block)


def comments(imp: Imported) -> list[str]:
    """What the file says about the import: where from, what to set, what was left out."""
    lines = [f"Service {imp.name}: imported from {imp.source} ({imp.title}, OpenAPI {imp.version})."]
    ops = len(imp.service["operations"])
    lines.append(
        f"{ops} operations imported, {len(imp.skipped)} not expressible"
        + (f", {imp.excluded} not chosen" if imp.excluded else "")
        + "."
    )
    if imp.env:
        lines.append("Set these environment variables (or NAME_FILE) before use:")
        lines += [f"  {e}" for e in imp.env]
    if imp.skipped:
        lines.append("Not imported (cannot be expressed as rest operations):")
        lines += [f"  - {what}: {why}" for what, why in imp.skipped]
    if imp.notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in imp.notes]
    return [f"# {line}".rstrip() for text in lines for line in text.splitlines()]


def service_yaml(imp: Imported, indent: int = 0) -> str:
    text = yaml.dump({imp.name: imp.service}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    pad = " " * indent
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def render(imp: Imported) -> str:
    """A complete services file holding the imported service."""
    return "\n".join(comments(imp)) + "\nservices:\n" + service_yaml(imp, indent=2)


def merge(imp: Imported, path: Path) -> None:
    """Add the service to the services file at ``path``, keeping the file as it is around it.

    Refuses when the file has a service of the same name or no block ``services:`` mapping;
    writes a checked copy in place of the file, never half a file."""
    try:
        existing = read_file(path)
    except ConfigError as e:
        raise ImportFailed(f"--merge: {e}") from None
    if imp.name in (existing.get("services") or {}):
        raise ImportFailed(f"--merge: {path.name} already has a service named {imp.name}")
    lines = path.read_text().splitlines(keepends=True)
    at = next(
        (i for i, line in enumerate(lines) if line.rstrip().split("#")[0].rstrip() == "services:"), None
    )
    if at is None:
        raise ImportFailed(f"--merge: {path.name} has no block 'services:' line to add to")
    block = "".join(f"  {c}\n" for c in comments(imp)) + service_yaml(imp, indent=2)
    merged = "".join(lines[: at + 1]) + block + "".join(lines[at + 1 :])
    fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(merged)
        if imp.name not in (read_file(Path(tmp)).get("services") or {}):
            raise ImportFailed("--merge: the merged file did not hold the service; left unchanged")
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
