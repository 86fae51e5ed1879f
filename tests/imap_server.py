"""A real IMAP server for the tests: Dovecot (Debian's ``dovecot-imapd``) on a loopback port.

Each server has its own folder (config, state, log, maildirs) and its own short runtime folder
(sockets), one user with a plaintext password, plain IMAP on 127.0.0.1 and nothing else. It runs
in the foreground as a child in its own session and is stopped with the fixture: no process
outlives it.

Users: as a normal user everything runs as that user. As root, Dovecot refuses uid 0 both for
its login processes and for mail access, so the master and its internal services run as root
and the login and mail processes as ``nobody``; the mail folder is given to ``nobody``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

DOVECOT = "/usr/sbin/dovecot"
HOST = "127.0.0.1"

# Dovecot 2.3 (Debian 12); 2.4 renamed many settings and is refused below.
CONF = """\
base_dir = {run}
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
mail_uid = {mail_uid}
mail_gid = {mail_gid}
mail_home = {root}/mail/%u
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


@dataclass
class ImapServer:
    host: str
    port: int
    user: str
    password: str
    root: Path  # config, state, log and mail (under mail/<user>/Maildir)
    process: subprocess.Popen[bytes]

    def client(self) -> IMAPClient:
        """A logged-in client over plain IMAP; the caller logs out (or uses it as a context)."""
        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=10)
        c.login(self.user, self.password)
        return c

    def append(self, folder: str, message: bytes) -> int:
        """Append ``message`` to ``folder`` (made if missing); return its UID."""
        with self.client() as c:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            answer = c.append(folder, message)
        # b"[APPENDUID <uidvalidity> <uid>] Append completed."
        found = re.match(rb"\[APPENDUID \d+ (\d+)\]", answer)
        if found is None:
            raise RuntimeError(f"no APPENDUID in dovecot's answer: {answer!r}")
        return int(found.group(1))

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self.client() as c:
            return int(c.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])

    def uids(self, folder: str = "INBOX") -> list[int]:
        with self.client() as c:
            c.select_folder(folder, readonly=True)
            return sorted(int(uid) for uid in c.search("ALL"))

    def recreate(self, folder: str) -> None:
        """Delete and create ``folder`` again: its messages go, and its UIDVALIDITY changes.
        Not for INBOX, which IMAP cannot delete: see ``reset_uidvalidity``."""
        with self.client() as c:
            c.delete_folder(folder)
            c.create_folder(folder)

    def reset_uidvalidity(self, folder: str = "INBOX") -> int:
        """Renumber ``folder`` while the server runs, as a server that lost its index does: the
        messages stay, get new UIDs from 1, and the folder a new UIDVALIDITY, which is returned.

        Removes Dovecot's UID list and indexes of the maildir (and the mailbox list index that
        caches STATUS); Dovecot rebuilds them on the next access, with the next UIDVALIDITY from
        its per-user counter, so the new value is always greater. A session that has the folder
        selected meanwhile keeps its old view until it selects the folder again."""
        before = self.uidvalidity(folder)
        maildir = self.root / "mail" / self.user / "Maildir"
        box = maildir if folder.upper() == "INBOX" else maildir / f".{folder}"  # Maildir++
        if not box.is_dir():
            raise FileNotFoundError(f"no maildir for folder {folder!r} at {box}")
        stale = [*box.glob("dovecot-uidlist*"), *box.glob("dovecot.index*")]
        for f in [*stale, *maildir.glob("dovecot.list.index*")]:
            f.unlink(missing_ok=True)
        after = self.uidvalidity(folder)
        if after == before:
            raise RuntimeError(f"UIDVALIDITY of {folder!r} did not change ({before})")
        return after

    def log(self, lines: int = 30) -> str:
        """The last ``lines`` of Dovecot's log and of its own stderr (where config errors go)."""
        out = []
        for name in ("dovecot.stderr", "dovecot.log"):
            path = self.root / name
            if path.exists() and (text := path.read_text(errors="replace").strip()):
                out.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out) or "(no log)"

    def stop(self) -> None:
        """Stop the master and all its children (they share its process group): SIGTERM to the
        group, which mostly takes milliseconds (SIGTERM to the master alone takes 2-3 s), then
        SIGKILL after 1 s (the master now and then sleeps 2 s in its shutdown). Raises if any
        process is left. Calling it again does nothing."""
        pgid = self.process.pid
        if self.process.returncode is not None and not _group_alive(pgid):
            return
        for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            with suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.process.poll() is not None and not _group_alive(pgid):
                    return
                time.sleep(0.02)
        raise RuntimeError(f"dovecot's processes (group {pgid}) outlived SIGKILL")


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group, from /proc (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _version() -> tuple[int, int]:
    out = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, timeout=10, check=True)
    found = re.match(r"(\d+)\.(\d+)", out.stdout)
    if found is None:
        raise RuntimeError(f"cannot read Dovecot's version from {out.stdout!r}")
    return int(found.group(1)), int(found.group(2))


def _accounts() -> dict[str, str]:
    """Who Dovecot's processes run as (see the module's docstring)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return {
            "internal_user": me.pw_name,
            "internal_group": grp.getgrgid(me.pw_gid).gr_name,  # a name: Dovecot looks it up
            "login_user": me.pw_name,
            "mail_uid": str(me.pw_uid),
            "mail_gid": str(me.pw_gid),
        }
    nobody = pwd.getpwnam("nobody")
    return {
        "internal_user": "root",
        "internal_group": "root",
        "login_user": "nobody",
        "mail_uid": str(nobody.pw_uid),
        "mail_gid": str(nobody.pw_gid),
    }


def _wait_for_greeting(server: ImapServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((server.host, server.port), timeout=1) as s:
                if s.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            pass
        if server.process.poll() is not None:
            raise RuntimeError(
                f"dovecot exited with {server.process.returncode} before listening on port {server.port}:\n"
                + server.log()
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"dovecot not ready on port {server.port} in {timeout:g}s:\n" + server.log())
        time.sleep(0.05)


@contextmanager
def imap_server(
    tmp: Path | None = None,
    *,
    port: int | None = None,
    password: str | None = None,
    startup_timeout: float = 10.0,
) -> Iterator[ImapServer]:
    """Start a Dovecot of its own, yield it once it greets, stop it on exit.

    ``tmp``: where to make the server's folder (default: the system's temp dir, and the folder
    is removed on exit; under ``tmp`` it is kept). ``port``: default a free one. ``password``
    of the user ``agent``: default a random one. Fails (never skips) if Dovecot is missing."""
    if not os.access(DOVECOT, os.X_OK):
        raise RuntimeError(
            f"{DOVECOT} is missing: install Debian's dovecot-imapd "
            "(apt-get install dovecot-imapd; .ci/run does it) to run the IMAP tests"
        )
    major, minor = _version()
    if (major, minor) >= (2, 4):
        raise RuntimeError(
            f"tests/imap_server.py writes a Dovecot 2.3 configuration; this is {major}.{minor}"
        )
    accounts = _accounts()
    root = Path(tempfile.mkdtemp(prefix="dovecot-", dir=tmp)).resolve()
    # Sockets live in a short folder of their own: unix socket paths are limited to 108 bytes.
    run = Path(tempfile.mkdtemp(prefix="dovecot-run-"))
    try:
        for d in (root, run):  # Dovecot wants base_dir world-readable, and
            d.chmod(0o755)  # as root, nobody's login and mail processes must reach into both
        if os.geteuid() == 0:
            blocked = [p for p in root.parents if not os.stat(p).st_mode & 0o001]
            if blocked:
                raise RuntimeError(f"dovecot's mail user nobody cannot enter {blocked[0]}: use another tmp")
        for sub in ("state", "mail"):
            (root / sub).mkdir()
        os.chown(root / "mail", int(accounts["mail_uid"]), int(accounts["mail_gid"]))
        user, password = "agent", password or "imap-" + os.urandom(8).hex()
        users = root / "users"
        users.write_text(f"{user}:{{PLAIN}}{password}::::::\n")
        users.chmod(0o600)
        conf = root / "dovecot.conf"
        port = port or _free_port()
        conf.write_text(CONF.format(root=root, run=run, host=HOST, port=port, **accounts))
        with (root / "dovecot.stderr").open("wb") as stderr:
            proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group, for stop()
            )
        server = ImapServer(HOST, port, user, password, root, proc)
        try:
            _wait_for_greeting(server, startup_timeout)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(run, ignore_errors=True)
        if tmp is None:
            shutil.rmtree(root, ignore_errors=True)
