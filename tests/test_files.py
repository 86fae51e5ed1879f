"""The ``files`` kind on a real directory tree, through real workers: round trips, the sandbox's
refusals (symlinks planted inside and outside the root, ``..``, absolute paths, NUL, FIFOs,
sockets, devices), a directory swapped for a symlink while jobs run, and the limits.

The roots are those of tests/services.yaml under FILES_BASE; each test lays them out afresh.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FILES_BASE
from procs import cli

from integrations.errors import PermanentError, UnknownOperation
from integrations.ledger import reads
from integrations.services import get_services
from integrations.services.base import Attempt
from integrations.services.files import FilesService
from integrations.services.files_sandbox import Refused
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")

RW, RO, LIMITED, OUTSIDE = (FILES_BASE / n for n in ("rw", "ro", "limited", "outside"))
BINARY = bytes(range(256)) * 3
AS_ROOT = os.geteuid() == 0


def lay_out() -> None:
    """The tree every test starts from: links inside and out, and files no one may open."""
    for d in (RW, RO, LIMITED, OUTSIDE):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (OUTSIDE / "secret.txt").write_text("outside secret")
    (RW / "notes" / "deep").mkdir(parents=True)
    (RW / "notes" / "a.txt").write_text("inside a")
    (RW / "notes" / "deep" / "b.md").write_text("inside b")
    (RW / "inside_link").symlink_to("notes")  # relative, inside
    (RW / "abs_inside.txt").symlink_to(RW / "notes" / "a.txt")  # absolute, inside
    (RW / "escape").symlink_to("../outside")  # relative, outside
    (RW / "escape_abs").symlink_to(OUTSIDE)  # absolute, outside
    (RW / "notes" / "up.txt").symlink_to("../../outside/secret.txt")  # deeper, outside
    (RW / "loop").symlink_to("loop")
    os.mkfifo(RW / "pipe")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(RW / "sock"))
    if AS_ROOT:
        os.mknod(RW / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (RO / "readme.txt").write_text("read me")
    (LIMITED / "seed.txt").write_text("x" * 100)


@pytest.fixture(autouse=True)
def tree() -> Iterator[None]:
    lay_out()
    yield
    assert sorted(p.name for p in OUTSIDE.iterdir()) == ["secret.txt"], "something was written outside"
    assert (OUTSIDE / "secret.txt").read_text() == "outside secret"


def run(service: str, op: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay(service, op, params).get(timeout=30)
    return out


def refused(service: str, op: str, **params: Any) -> str:
    """The job's error: it must fail at once, permanently."""
    result = call_service.delay(service, op, params)
    with pytest.raises(PermanentError) as e:
        result.get(timeout=30)
    job = reads.get_job(result.id)
    assert job is not None and (job["status"], job["attempts"]) == ("failed", 1)
    return str(e.value)


def test_write_read_list_stat_move_delete_round_trip() -> None:
    assert run("files_rw", "write", path="out/report.txt", content="v1", mode="create", make_dirs=True)[
        "data"
    ] == {
        "path": "out/report.txt",
        "bytes": 2,
        "created": True,
    }
    assert refused("files_rw", "write", path="out/report.txt", content="v2", mode="create") == (
        "path: already exists (mode: create)"
    )
    run("files_rw", "write", path="out/report.txt", content="v2 ✓", mode="overwrite")
    text = run("files_rw", "read", path="out/report.txt")["data"]
    assert (text["content"], text["size"], text["truncated"]) == ("v2 ✓", 6, False)

    encoded = base64.b64encode(BINARY).decode()
    run("files_rw", "write", path="out/blob.bin", content=encoded, encoding="base64", mode="create")
    assert (RW / "out" / "blob.bin").read_bytes() == BINARY
    assert run("files_rw", "read", path="out/blob.bin", encoding="base64")["data"]["content"] == encoded
    assert (
        refused("files_rw", "read", path="out/blob.bin")
        == "path: not UTF-8 text; read it with encoding: base64"
    )
    part = run("files_rw", "read", path="out/blob.bin", encoding="base64", offset=256, length=10)["data"]
    assert base64.b64decode(part["content"]) == BINARY[256:266] and part["truncated"] is True

    listed = run("files_rw", "list", pattern="**/*.txt")["data"]["entries"]
    assert [(e["path"], e["type"]) for e in listed] == [
        ("abs_inside.txt", "symlink"),
        ("notes/a.txt", "file"),
        ("notes/up.txt", "symlink"),
        ("out/report.txt", "file"),
    ]
    assert [e["path"] for e in run("files_rw", "list", path="notes", pattern="*")["data"]["entries"]] == [
        "notes/a.txt",
        "notes/deep",
        "notes/up.txt",
    ]
    stat_ = run("files_rw", "stat", path="out/report.txt")["data"]
    assert (stat_["type"], stat_["size"], stat_["exists"]) == ("file", 6, True)

    run("files_rw", "move", src="out/report.txt", dst="notes/report.txt")
    assert (RW / "notes" / "report.txt").read_text() == "v2 ✓" and not (RW / "out" / "report.txt").exists()
    assert (
        refused("files_rw", "move", src="notes/a.txt", dst="notes/report.txt")
        == "dst: already exists (mode: create)"
    )
    assert refused("files_rw", "delete", path="notes") == "path: directory not empty"
    run("files_rw", "delete", path="notes/report.txt")
    assert run("files_rw", "stat", path="notes/report.txt")["data"] == {
        "path": "notes/report.txt",
        "exists": False,
    }
    # Written through a temporary file and a rename: none is left behind.
    assert not [p for p in RW.rglob(".integrations-*")]


def test_symlinks_inside_the_root_are_followed_and_those_out_of_it_refused() -> None:
    assert run("files_rw", "read", path="inside_link/a.txt")["data"]["content"] == "inside a"
    assert run("files_rw", "read", path="abs_inside.txt")["data"]["path"] == "notes/a.txt"
    out = "a symlink on the path points outside the root"
    assert refused("files_rw", "read", path="escape/secret.txt") == f"path: {out}"
    assert refused("files_rw", "read", path="escape_abs/secret.txt") == f"path: {out}"
    assert refused("files_rw", "read", path="notes/up.txt") == f"path: {out}"
    assert refused("files_rw", "stat", path="escape") == f"path: {out}"
    assert refused("files_rw", "list", path="escape_abs") == f"path: {out}"
    assert refused("files_rw", "write", path="escape/new.txt", content="x", mode="create") == f"path: {out}"
    assert refused(
        "files_rw", "write", path="escape/d/new.txt", content="x", mode="create", make_dirs=True
    ) == (f"path: {out}")
    assert refused("files_rw", "move", src="notes/a.txt", dst="escape_abs/a.txt") == f"dst: {out}"
    assert refused("files_rw", "read", path="loop") == "path: passes through more than 40 symlinks"
    # A link is replaced or deleted as itself, never written through.
    assert refused("files_rw", "write", path="escape_abs", content="x", mode="overwrite") == (
        "path: not a regular file (a symlink)"
    )
    run("files_rw", "delete", path="escape")
    assert not (RW / "escape").exists() and (OUTSIDE / "secret.txt").exists()


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("read", {"path": "/etc/passwd"}, "path: must be relative to the service's root (no leading /)"),
        ("read", {"path": "notes/../../outside/secret.txt"}, "path: must not contain '..'"),
        ("read", {"path": "notes/a.txt\x00.png"}, "path: contains a NUL byte"),
        ("read", {"path": "pipe"}, "path: not a regular file (a fifo)"),
        ("read", {"path": "sock"}, "path: not a regular file (a socket)"),
        pytest.param(
            "read",
            {"path": "null"},
            "path: not a regular file (a device)",
            marks=pytest.mark.skipif(not AS_ROOT, reason="making a device file takes root"),
        ),
        ("read", {"path": "notes"}, "path: not a regular file (a directory)"),
        ("read", {"path": ""}, "path: is the root directory, not a file"),
        ("write", {"path": "pipe", "content": "x", "mode": "overwrite"}, "path: not a regular file (a fifo)"),
        (
            "write",
            {"path": "notes", "content": "x", "mode": "overwrite"},
            "path: not a regular file (a directory)",
        ),
        (
            "write",
            {"path": "nowhere/x.txt", "content": "x", "mode": "create"},
            "path: no such file or directory",
        ),
        (
            "write",
            {"path": "a.txt", "content": "%%%", "encoding": "base64", "mode": "create"},
            "content: not valid base64",
        ),
        ("delete", {"path": "pipe"}, "path: not a regular file, symlink or directory (a fifo)"),
        ("delete", {"path": "."}, "path: the root itself cannot be deleted"),
        ("move", {"src": "sock", "dst": "sock2"}, "src: not a regular file or directory (a socket)"),
        ("move", {"src": "notes", "dst": "notes/deep/notes"}, "dst: cannot be moved into itself"),
        ("list", {"pattern": "../*"}, "pattern: must not contain '..'"),
        ("read", {"path": "missing.txt"}, "path: no such file or directory"),
    ],
)
def test_every_refusal_is_permanent_and_names_the_rule(op: str, params: dict[str, Any], message: str) -> None:
    assert refused("files_rw", op, **params) == message


def test_a_hard_link_to_a_file_outside_the_root_is_not_read() -> None:
    os.link(OUTSIDE / "secret.txt", RW / "hard.txt")
    try:
        assert refused("files_rw", "read", path="hard.txt") == (
            "path: a file with more than one hard link is not read"
        )
    finally:
        (RW / "hard.txt").unlink()


def test_a_directory_swapped_for_a_symlink_never_lets_a_read_or_write_out() -> None:
    """A thread flips ``swap`` between a directory inside and a symlink to the outside while jobs
    read and write under it: every read sees the inside file or is refused, nothing is written
    outside (the fixture checks), and both outcomes happened."""
    (RW / "swap").mkdir()
    (RW / "swap" / "f.txt").write_text("inside")
    (OUTSIDE / "f.txt").write_text("OUTSIDE")  # what a read through the link would see
    stop, flips = threading.Event(), [0]

    def flip() -> None:
        while not stop.is_set():
            os.rename(RW / "swap", RW / "swap_real")
            os.symlink(OUTSIDE, RW / "swap")
            os.unlink(RW / "swap")
            os.rename(RW / "swap_real", RW / "swap")
            flips[0] += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        reads = [call_service.delay("files_rw", "read", {"path": "swap/f.txt"}) for _ in range(60)]
        writes = [
            call_service.delay(
                "files_rw", "write", {"path": f"swap/w{i}.txt", "content": "w", "mode": "create"}
            )
            for i in range(30)
        ]
        outcomes = [_outcome(r) for r in reads + writes]
        # And straight through the kind, many times faster than jobs go.
        svc = get_services()["files_rw"]
        read = svc.catalog()["read"]
        for _ in range(2000):
            try:
                outcomes.append(
                    ("read", svc.call(read, {"path": "swap/f.txt"}, Attempt("race")).data["content"])
                )
            except Refused as e:
                outcomes.append(("refused", str(e)))
    finally:
        stop.set()
        flipper.join(timeout=10)
    (OUTSIDE / "f.txt").unlink()

    assert flips[0] > 100
    assert {o for o in outcomes if o[0] == "read"} == {("read", "inside")}
    expected = {"path: a symlink on the path points outside the root", "path: no such file or directory"}
    assert {o[1] for o in outcomes if o[0] == "refused"} <= expected
    kinds = {o[0] for o in outcomes}
    assert {"read", "refused"} <= kinds, kinds
    written = [p.name for p in (RW / "swap").iterdir() if p.name.startswith("w")]
    assert len(written) == sum(1 for o in outcomes if o == ("wrote", "ok"))


def _outcome(result: Any) -> tuple[str, str]:
    try:
        out = result.get(timeout=60)
    except PermanentError as e:
        return ("refused", str(e))
    if out["operation"] == "write":
        return ("wrote", "ok")
    return ("read", out["data"]["content"])


def test_size_quota_extension_and_listing_limits() -> None:
    assert refused("files_limited", "write", path="big.txt", content="x" * 1001, mode="create") == (
        "content: larger than 1000 bytes (the service's file_max_bytes)"
    )
    assert refused("files_limited", "write", path="run.sh", content="x", mode="create") == (
        "path: its extension is not one of the service's extensions"
    )
    (LIMITED / "other.bin").write_bytes(b"x")
    assert (
        refused("files_limited", "read", path="other.bin")
        == "path: its extension is not one of the service's extensions"
    )
    for name in ("one.txt", "two.md"):
        run("files_limited", "write", path=name, content="y" * 1000, mode="create")
    # 100 (seed) + 1 (other.bin) + 2000 are there: 1000 more would pass 3000.
    assert refused("files_limited", "write", path="three.txt", content="z" * 1000, mode="create") == (
        "content: the root would hold more than 3000 bytes (quota_bytes)"
    )
    run("files_limited", "write", path="one.TXT", content="z" * 899, mode="create")  # exactly 3000
    run("files_limited", "write", path="one.txt", content="z" * 500, mode="overwrite")  # the old size counts
    read = run("files_limited", "read", path="one.txt")["data"]
    assert (read["bytes"], read["size"], read["truncated"]) == (64, 500, True)  # read_max_bytes: 64
    for i in range(5):
        (LIMITED / f"n{i}.md").write_text("")
    listed = run("files_limited", "list")["data"]
    assert len(listed["entries"]) == 5 and listed["truncated"] is True  # list_max: 5
    assert "other.bin" not in {e["path"] for e in listed["entries"]}


def test_a_read_only_service_offers_no_way_to_change_anything() -> None:
    assert run("files_ro", "read", path="readme.txt")["data"]["content"] == "read me"
    for op in ("write", "move", "delete"):
        with pytest.raises(UnknownOperation, match=r"has no such operation \(it has: list, read, stat\)"):
            call_service.delay("files_ro", op, {"path": "readme.txt"})
    assert (RO / "readme.txt").read_text() == "read me"


def test_the_cli_writes_and_reads_and_services_lists_the_operations() -> None:
    wrote = cli("call", "files_rw", "write", "path=cli/hello.txt", "content=hi from the CLI", "mode=create",
                "make_dirs=true", "--wait", "--timeout", "30")  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    read = cli("call", "files_rw", "read", "path=cli/hello.txt", "--wait", "--timeout", "30")
    assert json.loads(read.stdout)["data"]["content"] == "hi from the CLI"
    failed = cli("call", "files_rw", "read", "path=../outside/secret.txt", "--wait", "--timeout", "30")
    assert failed.returncode == 1 and failed.stderr.endswith("failed: path: must not contain '..'\n")

    listed = cli("services").stdout
    assert f"files_rw (files, {RW}, read-write)" in listed
    assert f"files_limited (files, {LIMITED}, read-write, .txt .md)" in listed
    assert "  write: Write a file atomically" in listed and "  move: Move or rename" in listed


def test_the_health_check_is_the_root_being_a_directory(tmp_path: Path) -> None:
    assert get_services()["files_rw"].check_health().excerpt == "root is a directory"
    with pytest.raises(PermanentError, match=r"^root: no such file or directory$"):
        FilesService(name="gone", root=tmp_path / "missing").check_health()
    (tmp_path / "file").write_text("")
    with pytest.raises(PermanentError, match=r"^root: a component of the path is not a directory$"):
        FilesService(name="file", root=tmp_path / "file").check_health()
    schema = get_services()["files_rw"].catalog()["write"].parameters
    assert schema["required"] == ["path", "content", "mode"]
    assert schema["properties"]["mode"]["enum"] == ["create", "overwrite"]
