"""Encryption of connections' tokens at rest: ``cryptography``'s Fernet (AES-128-CBC with an
HMAC-SHA256, https://github.com/fernet/spec) under a list of keys, newest first.

``INTEGRATIONS_KEYS`` (or the file ``INTEGRATIONS_KEYS_FILE`` names) is a comma-separated list
of Fernet keys. The first encrypts; every one of them decrypts (``MultiFernet``), so a new key
goes in front, ``integrations keys rotate`` re-encrypts every row with it, and the old key is
removed once no row needs it. Each row records which key encrypted it (``key_id``, the first
16 hex digits of the key's SHA-256), which makes the rotation resumable and lets ``integrations
keys status`` say what each key still holds.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from integrations.auth import token_auth
from integrations.config import get_settings
from integrations.errors import ConfigError

SETTING = "INTEGRATIONS_KEYS"


def key_id(key: bytes) -> str:
    """A key's name in the ledger: not the key, and says nothing useful about it."""
    return hashlib.sha256(key).hexdigest()[:16]


def generate() -> str:
    """A new Fernet key (32 random bytes, URL-safe base64)."""
    return Fernet.generate_key().decode()


@dataclass(frozen=True)
class Keys:
    """The keys of this process: ``ids[0]`` encrypts, all decrypt."""

    ids: tuple[str, ...]
    _fernets: tuple[Fernet, ...]

    @property
    def primary(self) -> str:
        return self.ids[0]

    def encrypt(self, plaintext: bytes) -> tuple[str, str]:
        """``(token, key_id)``: ``plaintext`` encrypted with the newest key."""
        return self._fernets[0].encrypt(plaintext).decode(), self.primary

    def decrypt(self, token: str, stored_key_id: str | None = None) -> bytes:
        """The plaintext of ``token``. Raises :class:`ConfigError` when no key here opens it
        (its key was removed too early, or the row was altered)."""
        try:
            return MultiFernet(list(self._fernets)).decrypt(token.encode())
        except InvalidToken:
            which = f" (encrypted with key {stored_key_id})" if stored_key_id else ""
            raise ConfigError(
                f"stored tokens cannot be decrypted with any key in {SETTING}{which}: "
                "was a key removed before 'integrations keys rotate' ran?"
            ) from None

    def rotate(self, token: str) -> tuple[str, str]:
        """``token`` re-encrypted with the newest key: ``(token, key_id)``."""
        try:
            return MultiFernet(list(self._fernets)).rotate(token.encode()).decode(), self.primary
        except InvalidToken:
            raise ConfigError(f"stored tokens cannot be decrypted with any key in {SETTING}") from None


def parse(value: str) -> Keys:
    """``Keys`` from a comma-separated list; raises :class:`ConfigError` naming the bad entry
    by its position, never its value."""
    entries = [v.strip() for v in value.split(",") if v.strip()]
    if not entries:
        raise ConfigError(f"{SETTING} is empty")
    fernets = []
    for n, entry in enumerate(entries, 1):
        try:
            fernets.append(Fernet(entry.encode()))
        except ValueError:
            raise ConfigError(
                f"{SETTING}: key {n} is not a Fernet key (32 url-safe base64-encoded bytes; "
                "'integrations keys generate' makes one)"
            ) from None
    ids = tuple(key_id(e.encode()) for e in entries)
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{SETTING}: a key is listed twice")
    return Keys(ids, tuple(fernets))


@functools.cache
def get_keys() -> Keys:
    """This process's keys. Raises :class:`ConfigError` when ``INTEGRATIONS_KEYS`` is not set."""
    value = get_settings().integrations_keys
    if value is None:
        raise ConfigError(
            f"{SETTING} is not set (nor {SETTING}_FILE): connections' tokens are encrypted with it; "
            "'integrations keys generate' makes a key"
        )
    return parse(value.get_secret_value())


def require_for(services: Iterable[object]) -> None:
    """Refuse to go on (:class:`ConfigError`, saying why) when a service keeps tokens in the
    ledger and this process has no key to encrypt them with. Run at a worker's and the
    receiver's start."""
    needing = sorted(str(getattr(s, "name", "?")) for s in services if token_auth(s) is not None)
    if not needing:
        return
    if get_settings().integrations_keys is None:
        raise ConfigError(
            f"{SETTING} is not set (nor {SETTING}_FILE), and services {', '.join(needing)} keep OAuth "
            "tokens encrypted with it; 'integrations keys generate' makes a key"
        )
    get_keys()  # a malformed list stops the process too
