"""A sandboxed file system: the ``files`` kind, rooted at one directory per service.

::

    services:
      workspace:
        kind: files
        root: /srv/agent-workspace
        read_only: false
        extensions: [.txt, .md, .csv, .json]
        file_max_bytes: 1048576
        quota_bytes: 104857600

Operations: ``read`` (text or base64, a bounded range), ``write`` (atomic: a temporary file
then a rename; ``mode: create`` or ``overwrite`` said by the caller), ``list`` (a glob under a
directory, bounded), ``stat``, ``move``, ``delete``. A read-only service offers ``read``,
``list`` and ``stat`` only.

No path leaves the root (:mod:`integrations.services.files_sandbox`): absolute paths, ``..``,
NUL bytes, symlinks that point outside, devices, FIFOs and sockets are refused, each with a
permanent error naming the rule. The refusals happen in the worker, so each is a failed job in
the ledger: an agent trying to leave its sandbox leaves a trace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator

from integrations.services import files_ops
from integrations.services.base import Attempt, Operation, Outcome, Service
from integrations.services.files_sandbox import Refused, Tree, os_error

OpName = Literal["read", "write", "list", "stat", "move", "delete"]
WRITES = ("write", "move", "delete")

_PATH = {
    "type": "string",
    "maxLength": 4096,
    "description": "A path under the service's root, names separated by /; no leading /, no '..'.",
}
_MODE = {
    "type": "string",
    "enum": ["create", "overwrite"],
    "description": "create: fail if the target exists; overwrite: replace it (or create it).",
}
_ENCODING = {
    "type": "string",
    "enum": ["text", "base64"],
    "default": "text",
    "description": "text: UTF-8; base64: any bytes.",
}
_DESCRIPTIONS: dict[str, str] = {
    "read": "Read a file (or a range of it) as UTF-8 text or base64.",
    "write": "Write a file atomically; say whether it may replace an existing one.",
    "list": "List entries under a directory matching a glob (* and ? within a name, ** any depth).",
    "stat": "Type, size and modification time of a path (exists: false when nothing is there).",
    "move": "Move or rename a file or directory within the root.",
    "delete": "Delete a file, a symlink or an empty directory.",
}


class FilesOperation(Operation):
    """One of the built-in operations, with the service's limits in its schema."""

    name: OpName
    read_max_bytes: int
    list_max: int

    def build_parameters(self) -> dict[str, Any]:
        props: dict[str, dict[str, Any]]
        required = ["path"]
        if self.name == "read":
            props = {
                "path": _PATH,
                "encoding": _ENCODING,
                "offset": {"type": "integer", "minimum": 0, "default": 0, "description": "Byte to start at."},
                "length": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.read_max_bytes,
                    "default": self.read_max_bytes,
                    "description": "Bytes to read at most.",
                },
            }
        elif self.name == "write":
            props = {
                "path": _PATH,
                "content": {
                    "type": "string",
                    "writeOnly": True,
                    "description": "The file's content, as encoding says.",
                },
                "encoding": _ENCODING,
                "mode": _MODE,
                "make_dirs": {
                    "type": "boolean",
                    "default": False,
                    "description": "Create missing parent directories.",
                },
            }
            required = ["path", "content", "mode"]
        elif self.name == "list":
            props = {
                "path": {**_PATH, "default": "", "description": "The directory to list (default: the root)."},
                "pattern": {
                    "type": "string",
                    "maxLength": 1024,
                    "default": "*",
                    "description": "A glob relative to path: * and ? within a name, ** for any depth.",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.list_max,
                    "default": self.list_max,
                },
            }
            required = []
        elif self.name == "move":
            props = {
                "src": {**_PATH, "description": "What to move."},
                "dst": {**_PATH, "description": "Where to; its directory must exist."},
                "mode": {**_MODE, "default": "create"},
            }
            required = ["src", "dst"]
        else:
            props = {"path": _PATH}
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
            "description": self.description,
        }


class FilesService(Service):
    health_own_check: ClassVar[bool] = True

    kind: Literal["files"] = "files"
    #: The directory everything happens under (an absolute path).
    root: Path
    #: Offer read, list and stat only.
    read_only: bool = False
    #: File names must end with one of these (``.txt``; case ignored). Default: any name.
    extensions: tuple[str, ...] | None = None
    #: A file written may be this large at most.
    file_max_bytes: int = Field(10 * 1024 * 1024, ge=0)
    #: All regular files under the root together may be this large at most (checked on write).
    quota_bytes: int | None = Field(None, ge=0)
    #: One read returns at most this many bytes (use offset for more).
    read_max_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024)
    #: One list returns at most this many entries.
    list_max: int = Field(1000, ge=1, le=100_000)

    _ops: dict[str, Operation] | None = PrivateAttr(default=None)

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute() or "\x00" in str(v):
            raise ValueError("must be an absolute path")
        if v == Path("/"):
            raise ValueError("must not be / itself")
        return v

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        out = tuple("." + e.lower().lstrip(".") for e in v)
        if any(len(e) < 2 or "/" in e or "\x00" in e for e in out):
            raise ValueError("each is a file name ending such as .txt")
        return out

    def catalog(self) -> Mapping[str, Operation]:
        if self._ops is None:
            names = [n for n in _DESCRIPTIONS if not (self.read_only and n in WRITES)]
            self._ops = {
                n: FilesOperation(
                    name=n,
                    description=_DESCRIPTIONS[n],
                    read_max_bytes=self.read_max_bytes,
                    list_max=self.list_max,
                )
                for n in names
            }
        return self._ops

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, FilesOperation)
        t0 = time.perf_counter()
        if self.read_only and op.name in WRITES:  # a job queued before read_only was set
            raise Refused(f"{op.name}: this service is read-only (read_only: true)")
        try:
            with Tree(self.root) as tree:
                data, meta, summary = files_ops.OPERATIONS[op.name](self, tree, params)
        except OSError as e:  # one the operation did not expect (the rest are named where they occur)
            raise os_error(e, op.name) from None
        return Outcome(data=data, latency_ms=(time.perf_counter() - t0) * 1000, excerpt=summary, meta=meta)

    def check_health(self) -> Outcome:
        """The root exists and is a directory (and is writable, unless read-only)."""
        if self.health is not None and self.health.operation is not None:
            return super().check_health()
        t0 = time.perf_counter()
        with Tree(self.root):
            pass
        if not self.read_only and not os.access(self.root, os.W_OK | os.X_OK):
            raise Refused("root: not writable by this process (or set read_only: true)")
        return Outcome(latency_ms=(time.perf_counter() - t0) * 1000, excerpt="root is a directory")

    def allowed_name(self, name: str) -> bool:
        return self.extensions is None or name.lower().endswith(self.extensions)

    def describe(self) -> str:
        access = "read-only" if self.read_only else "read-write"
        exts = f", {' '.join(self.extensions)}" if self.extensions else ""
        return f"files, {self.root}, {access}{exts}"
