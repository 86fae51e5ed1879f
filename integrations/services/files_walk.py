"""Walking a sandboxed tree: every entry under a directory, never through a symlink, at most
``SCAN_MAX`` of them; globs over the paths found; the bytes a root holds (its quota)."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterator

from integrations.services.files_sandbox import DIR_FLAGS, Refused

#: Entries one list or quota count looks at, at most.
SCAN_MAX = 100_000
#: Levels a ``**`` descends at most, and ``**`` in one pattern at most (each multiplies the work).
DEPTH_MAX = 64
GLOBSTARS_MAX = 3


def usage(root_fd: int) -> int:
    """Bytes of the regular files under the root (symlinks not followed)."""
    total = 0
    for _, st in walk(os.dup(root_fd), [], None):
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def walk(fd: int, rel: list[str], depth: int | None) -> Iterator[tuple[list[str], os.stat_result]]:
    """``(parts, lstat)`` of every entry under the directory ``fd`` (closed when done), down to
    ``depth`` levels (``None``: all). Never descends through a symlink. At most SCAN_MAX."""
    stack, seen = [(fd, rel)], 0
    try:
        while stack:
            dfd, here = stack.pop()
            try:
                with os.scandir(dfd) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > SCAN_MAX:
                            raise Refused(f"the directory holds more than {SCAN_MAX} entries to look at")
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed since the directory was read
                        yield [*here, entry.name], st
                        if stat.S_ISDIR(st.st_mode) and (depth is None or len(here) + 1 < depth):
                            with contextlib.suppress(OSError):  # gone or swapped meanwhile
                                stack.append(
                                    (os.open(entry.name, DIR_FLAGS, dir_fd=dfd), [*here, entry.name])
                                )
            finally:
                os.close(dfd)
    finally:
        for dfd, _ in stack:
            os.close(dfd)


def matches(pattern: list[str], parts: list[str]) -> bool:
    """Whether the path ``parts`` matches the glob ``pattern`` (split at ``/``): ``*``, ``?`` and
    ``[...]`` within a name, ``**`` for any number of names."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and matches(pattern[1:], parts[1:])
