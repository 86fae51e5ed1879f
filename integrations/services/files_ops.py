"""The ``files`` kind's operations, each on an open :class:`~integrations.services.files_sandbox.Tree`.

Each returns ``(data, meta, summary)``: what the caller gets, what the job keeps, and a line
for the ledger's excerpt (never a file's content). Writes, moves and deletes hold the root's
``flock``, so the quota check and the change are one step for every worker on the machine.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from integrations.services.files_sandbox import (
    Located,
    NotFound,
    Refused,
    Tree,
    kind_of,
    lstat,
    open_dir,
    open_file,
    os_error,
    parts_of,
)
from integrations.services.files_walk import DEPTH_MAX, GLOBSTARS_MAX, matches, usage, walk

Result = tuple[dict[str, Any], dict[str, Any], str]


class Limits(Protocol):
    @property
    def root(self) -> Path: ...
    @property
    def file_max_bytes(self) -> int: ...
    @property
    def quota_bytes(self) -> int | None: ...
    @property
    def read_max_bytes(self) -> int: ...
    @property
    def list_max(self) -> int: ...

    def allowed_name(self, name: str) -> bool: ...


def _check_name(svc: Limits, at: Located, where: str) -> None:
    if at.name is not None and not svc.allowed_name(at.name):
        raise Refused(f"{where}: its extension is not one of the service's extensions")


def _path(at: Located) -> str:
    return "/".join(at.parts)


def _when(st: os.stat_result) -> str:
    return dt.datetime.fromtimestamp(st.st_mtime, dt.UTC).isoformat()


@contextlib.contextmanager
def _locked(tree: Tree) -> Iterator[None]:
    fcntl.flock(tree.fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(tree.fd, fcntl.LOCK_UN)


def op_read(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    offset, length, encoding = (
        p.get("offset", 0),
        p.get("length", svc.read_max_bytes),
        p.get("encoding", "text"),
    )
    with tree.locate(p["path"], "path") as at:
        _check_name(svc, at, "path")
        fd = open_file(at, "path")
        try:
            size = os.fstat(fd).st_size
            chunks, got = [], 0
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise os_error(e, "path") from None
        finally:
            os.close(fd)
    raw = b"".join(chunks)
    truncated = offset + len(raw) < size
    if encoding == "base64":
        content = base64.b64encode(raw).decode("ascii")
    else:
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not (truncated and e.start >= len(raw) - 3):
                raise Refused("path: not UTF-8 text; read it with encoding: base64") from None
            raw = raw[: e.start]  # a character cut by length: left for the next read
            content, truncated = raw.decode("utf-8"), True
    data = {
        "path": _path(at),
        "encoding": encoding,
        "content": content,
        "offset": offset,
        "bytes": len(raw),
        "size": size,
        "truncated": truncated,
    }
    return data, {"bytes": len(raw), "truncated": truncated}, f"read {len(raw)} of {size} bytes"


def _content(p: dict[str, Any]) -> bytes:
    if p.get("encoding", "text") == "text":
        return str(p["content"]).encode("utf-8")
    try:
        return base64.b64decode(p["content"], validate=True)
    except (binascii.Error, ValueError):
        raise Refused("content: not valid base64") from None


def op_write(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    content, mode = _content(p), p["mode"]
    if len(content) > svc.file_max_bytes:
        raise Refused(f"content: larger than {svc.file_max_bytes} bytes (the service's file_max_bytes)")
    with (
        _locked(tree),
        tree.locate(p["path"], "path", follow=False, make_dirs=p.get("make_dirs", False)) as at,
    ):
        if at.name is None:
            raise Refused("path: is the root directory, not a file")
        _check_name(svc, at, "path")
        before = lstat(at, "path")
        if before is not None and mode == "create":
            raise Refused("path: already exists (mode: create)")
        if before is not None and not stat.S_ISREG(before.st_mode):
            raise Refused(f"path: not a regular file (a {kind_of(before.st_mode)})")
        if svc.quota_bytes is not None:
            after = usage(tree.fd) - (before.st_size if before else 0) + len(content)
            if after > svc.quota_bytes:
                raise Refused(f"content: the root would hold more than {svc.quota_bytes} bytes (quota_bytes)")
        _replace(at, content, mode)
    data = {"path": _path(at), "bytes": len(content), "created": before is None}
    return data, {"bytes": len(content), "created": before is None}, f"wrote {len(content)} bytes"


def _replace(at: Located, content: bytes, mode: str) -> None:
    """Write a temporary file beside the target, then put it in place: ``link`` for create (fails
    if the target appeared meanwhile), ``rename`` for overwrite. Readers see the old or the new
    file, never half of one."""
    assert at.name is not None
    tmp = f".integrations-{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=at.dir_fd
        )
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode == "create":
            os.link(tmp, at.name, src_dir_fd=at.dir_fd, dst_dir_fd=at.dir_fd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=at.dir_fd)
        else:
            os.rename(tmp, at.name, src_dir_fd=at.dir_fd, dst_dir_fd=at.dir_fd)
        os.fsync(at.dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=at.dir_fd)
        raise os_error(e, "path") from None


def op_list(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    pattern = parts_of(p.get("pattern", "*"), "pattern") or ["*"]
    limit = p.get("limit", svc.list_max)
    if pattern.count("**") > GLOBSTARS_MAX:
        raise Refused(f"pattern: at most {GLOBSTARS_MAX} '**'")
    depth = DEPTH_MAX if "**" in pattern else len(pattern)
    with tree.locate(p.get("path", ""), "path") as at:
        fd = open_dir(at, "path")
        base = at.parts
    found: list[dict[str, Any]] = []
    for parts, st in walk(fd, [], depth):
        if not matches(pattern, parts) or (stat.S_ISREG(st.st_mode) and not svc.allowed_name(parts[-1])):
            continue
        entry: dict[str, Any] = {
            "path": "/".join(base + parts),
            "type": kind_of(st.st_mode),
            "modified": _when(st),
        }
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
        found.append(entry)
    found.sort(key=lambda e: e["path"])
    truncated = len(found) > limit
    data = {"path": "/".join(base), "entries": found[:limit], "truncated": truncated}
    return data, {"entries": min(len(found), limit), "truncated": truncated}, f"{len(found)} entries"


def op_stat(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    try:
        with tree.locate(p["path"], "path") as at:
            st = lstat(at, "path")
            parts = at.parts
    except NotFound:
        st = None
    if st is None:
        return {"path": p["path"], "exists": False}, {}, "no such path"
    data: dict[str, Any] = {
        "path": "/".join(parts),
        "exists": True,
        "type": kind_of(st.st_mode),
        "modified": _when(st),
    }
    if stat.S_ISREG(st.st_mode):
        data["size"] = st.st_size
    return data, {}, f"a {data['type']}"


def op_move(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    with (
        _locked(tree),
        tree.locate(p["src"], "src", follow=False) as src,
        tree.locate(p["dst"], "dst", follow=False) as dst,
    ):
        if src.name is None or dst.name is None:
            raise Refused("src, dst: the root itself cannot be moved or replaced")
        st = lstat(src, "src")
        if st is None:
            raise NotFound("src: no such file or directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise Refused(f"src: not a regular file or directory (a {kind_of(st.st_mode)})")
        if stat.S_ISREG(st.st_mode):
            _check_name(svc, src, "src")
            _check_name(svc, dst, "dst")
        there = lstat(dst, "dst")
        if there is not None and p.get("mode", "create") == "create":
            raise Refused("dst: already exists (mode: create)")
        if there is not None and not (stat.S_ISREG(there.st_mode) and stat.S_ISREG(st.st_mode)):
            raise Refused("dst: only a regular file may replace a regular file")
        try:
            os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)
        except OSError as e:
            raise os_error(e, "dst") from None
    data = {"src": _path(src), "dst": _path(dst), "replaced": there is not None}
    return data, {}, "moved"


def op_delete(svc: Limits, tree: Tree, p: dict[str, Any]) -> Result:
    with _locked(tree), tree.locate(p["path"], "path", follow=False) as at:
        if at.name is None:
            raise Refused("path: the root itself cannot be deleted")
        st = lstat(at, "path")
        if st is None:
            raise NotFound("path: no such file or directory")
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(at.name, dir_fd=at.dir_fd)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                if stat.S_ISREG(st.st_mode):
                    _check_name(svc, at, "path")
                os.unlink(at.name, dir_fd=at.dir_fd)
            else:
                raise Refused(f"path: not a regular file, symlink or directory (a {kind_of(st.st_mode)})")
        except OSError as e:
            raise os_error(e, "path") from None
    return {"path": _path(at), "deleted": kind_of(st.st_mode)}, {}, f"deleted a {kind_of(st.st_mode)}"


OPERATIONS: dict[str, Callable[[Limits, Tree, dict[str, Any]], Result]] = {
    "read": op_read,
    "write": op_write,
    "list": op_list,
    "stat": op_stat,
    "move": op_move,
    "delete": op_delete,
}
