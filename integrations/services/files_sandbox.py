"""A directory tree no path can leave: every file is reached by a walk from the root's open
descriptor, one component at a time, each opened with ``O_NOFOLLOW`` relative to its parent's
descriptor (``openat``-style, through ``dir_fd``).

- A path is relative, without ``..`` or NUL; anything else is refused before the walk.
- A symlink met on the way is read, never followed by the kernel: its target is joined to the
  directories already walked and the walk starts again from the root's descriptor with the
  result. A target that leaves the root (an absolute path elsewhere, or ``..`` above it) is
  refused. A directory swapped for a symlink between one step and the next makes the next
  ``open`` fail (``O_NOFOLLOW``), and the walk starts over: nothing is ever opened outside.
- Only regular files are read, written, moved or deleted (and directories moved or, when
  empty, deleted): devices, FIFOs and sockets are refused, and a file is checked again by
  ``fstat`` on the descriptor actually opened.

Every refusal is a :class:`Refused` (permanent), naming the parameter and the rule, never the
path given. Not guarded: a process outside this service that can move the root's directories
to elsewhere on the machine (a descriptor held by a walk follows the directory it names).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from integrations.errors import CallError, PermanentError, TransientError

#: Symlinks one path may pass through (the kernel's own limit).
MAX_HOPS = 40
PATH_MAX = 4096
NAME_MAX = 255
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Opening a FIFO must not block, nor a terminal become ours.
_FILE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class Refused(PermanentError):
    """A path or an operation the sandbox does not allow."""


class NotFound(Refused):
    """Nothing is at the path (or a directory on the way is missing)."""


def parts_of(path: str, where: str) -> list[str]:
    """The components of ``path`` under the root (``""`` and ``"."`` are the root itself)."""
    if "\x00" in path:
        raise Refused(f"{where}: contains a NUL byte")
    if path.startswith("/") or path.startswith("\\"):
        raise Refused(f"{where}: must be relative to the service's root (no leading /)")
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise Refused(f"{where}: longer than {PATH_MAX} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"{where}: must not contain '..'")
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        raise Refused(f"{where}: a name is longer than {NAME_MAX} bytes")
    return parts


@dataclass
class Located:
    """Where a path ends: its parent directory, open, and its name in it (``None``: the root)."""

    dir_fd: int
    name: str | None
    #: The components from the root to it, symlinks resolved.
    parts: list[str]


class Tree:
    """The root of one service, open for one call. Use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise os_error(e, "root") from None
        #: What an absolute symlink inside may start with: the root as named and as resolved.
        self.prefixes = {os.path.normpath(root), os.path.realpath(root)}

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def locate(
        self, path: str, where: str, *, follow: bool = True, make_dirs: bool = False
    ) -> Iterator[Located]:
        """Walk to ``path``; yield its parent open. ``follow``: resolve a symlink at the end too
        (read, stat) rather than acting on the link (write, move, delete). ``make_dirs``: create
        missing directories on the way (write)."""
        parts, hops = parts_of(path, where), 0
        while True:
            found = self._walk(parts, where, follow, make_dirs)
            if isinstance(found, Located):
                break
            hops += 1
            if hops > MAX_HOPS:
                raise Refused(f"{where}: passes through more than {MAX_HOPS} symlinks")
            parts = found
        try:
            yield found
        finally:
            os.close(found.dir_fd)

    def _walk(self, parts: list[str], where: str, follow: bool, make_dirs: bool) -> Located | list[str]:
        """One walk: where ``parts`` ends, or the new parts to walk when a symlink was met."""
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if last and not (follow and _is_link(fd, part)):
                    located, fd = Located(fd, part, parts), -1
                    return located
                try:
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not make_dirs or last:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)  # as any other: never through a symlink
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    mode = _mode(fd, part)
                    if not stat.S_ISLNK(mode):
                        if mode == 0 or stat.S_ISDIR(mode):
                            return parts  # a symlink a moment ago, gone or a directory now: again
                        raise
                    try:
                        target = os.readlink(part, dir_fd=fd)
                    except OSError:
                        return parts  # changed meanwhile: walk again
                    return self._join(parts[:i], target, parts[i + 1 :], where)
                os.close(fd)
                fd = child
            located, fd = Located(fd, None, parts), -1
            return located
        except OSError as e:
            raise os_error(e, where) from None
        finally:
            if fd >= 0:
                os.close(fd)

    def _join(self, walked: list[str], target: str, rest: list[str], where: str) -> list[str]:
        """The parts a symlink in ``walked`` with ``target`` stands for, or refused if outside."""
        if target.startswith("/"):
            norm = os.path.normpath(target)
            prefix = next(
                (p for p in self.prefixes if norm == p or norm.startswith(p.rstrip("/") + "/")), None
            )
            if prefix is None:
                raise Refused(f"{where}: a symlink on the path points outside the root")
            base: list[str] = []
            target = norm[len(prefix) :]
        else:
            base = list(walked)
        for p in target.split("/") + rest:
            if p in ("", "."):
                continue
            if p == "..":
                if not base:
                    raise Refused(f"{where}: a symlink on the path points outside the root")
                base.pop()
            else:
                base.append(p)
        return base


def _is_link(dir_fd: int, name: str) -> bool:
    return stat.S_ISLNK(_mode(dir_fd, name))


def _mode(dir_fd: int, name: str) -> int:
    """The type and mode of ``name`` (a symlink as itself); 0 when nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return 0


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def open_file(at: Located, where: str, flags: int = os.O_RDONLY) -> int:
    """Open the regular file at ``at`` (never a symlink, device, FIFO or socket)."""
    if at.name is None:
        raise Refused(f"{where}: is the root directory, not a file")
    st = lstat(at, where)
    if st is None:
        raise NotFound(f"{where}: no such file or directory")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{where}: not a regular file (a {kind_of(st.st_mode)})")
    try:
        fd = os.open(at.name, flags | _FILE, dir_fd=at.dir_fd)
    except OSError as e:
        raise os_error(e, where) from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):  # swapped between the check and the open
        os.close(fd)
        raise Refused(f"{where}: not a regular file")
    if opened.st_nlink > 1:  # a hard link may name a file outside the root: never read one
        os.close(fd)
        raise Refused(f"{where}: a file with more than one hard link is not read")
    return fd


def open_dir(at: Located, where: str) -> int:
    """Open the directory at ``at`` (never through a symlink)."""
    try:
        return os.dup(at.dir_fd) if at.name is None else os.open(at.name, DIR_FLAGS, dir_fd=at.dir_fd)
    except OSError as e:
        raise os_error(e, where) from None


def lstat(at: Located, where: str) -> os.stat_result | None:
    """What is at ``at`` (a symlink as itself), or ``None`` when nothing is."""
    try:
        if at.name is None:
            return os.stat(at.dir_fd)
        return os.stat(at.name, dir_fd=at.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(e, where) from None


def os_error(e: OSError, where: str) -> CallError:
    """An ``OSError`` as one of the project's errors: failures that may pass (I/O, a full disk,
    an interrupted call) are transient, the rest permanent. Named by ``where``, not the path."""
    code = e.errno
    if code in (errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOSPC, errno.EDQUOT, errno.ESTALE, errno.EBUSY):
        return TransientError(f"{where}: {os.strerror(code or 0).lower()}")
    if code == errno.ENOENT:
        return NotFound(f"{where}: no such file or directory")
    reasons = {
        errno.EEXIST: "already exists (mode: create)",
        errno.ENOTDIR: "a component of the path is not a directory",
        errno.EISDIR: "is a directory",
        errno.ENOTEMPTY: "directory not empty",
        errno.ELOOP: "a symlink is in the way",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "the file system is read-only",
        errno.EXDEV: "on another file system",
        errno.EINVAL: "cannot be moved into itself",
        errno.ENAMETOOLONG: "name too long",
        errno.ENXIO: "not a regular file",
    }
    return Refused(f"{where}: {reasons.get(code or 0, (e.strerror or 'error').lower())}")
