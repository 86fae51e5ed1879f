"""Reading the services file: YAML, ``${VAR}`` substitution, and validation of each section.

Every error is a :class:`~integrations.errors.ConfigError` whose message names the section,
the entry and the field, never the value given, so a broken file cannot print a secret.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from integrations.config.schema import NAME, Mailbox, WebhookSource
from integrations.config.secrets import read_secret_file, unset_in, unset_marker, unset_message
from integrations.config.settings import Settings, get_settings
from integrations.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PLACEHOLDER = re.compile(r"__ENV_REF_(\d+)__")
SECTIONS = ("services", "webhooks", "mailboxes", "agents")

_M = TypeVar("_M", bound=BaseModel)


#: libyaml's safe loader when PyYAML has it: a services file with hundreds of imported
#: operations parses several times faster.
class DuplicateKey(ValueError):
    """A mapping gives one key twice: YAML keeps the last, which could drop a whole section."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe loader (libyaml's when there is one) that refuses duplicate keys."""


def _mapping(loader: Any, node: Any, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise DuplicateKey(f"'{key}' is given twice in one mapping (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_SAFE_LOADER: Any = _Loader


def read_file(path: Path) -> dict[str, Any]:
    """The services file as a mapping, ``${VAR}`` references still unexpanded."""
    try:
        text = path.read_text()
        # ${...} is not valid inside a YAML flow mapping ({token: ${X}}); stand a plain word in
        # for each reference while parsing, so values never go through the YAML parser either.
        refs: list[str] = []

        def placeholder(m: re.Match[str]) -> str:
            refs.append(m.group(0))
            return f"__ENV_REF_{len(refs) - 1}__"

        # A safe loader (CSafeLoader or SafeLoader): plain data only.
        raw = _restore_refs(yaml.load(_ENV_REF.sub(placeholder, text), Loader=_SAFE_LOADER), refs)  # noqa: S506
    except OSError as e:
        raise ConfigError(f"services file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        if "nesting depth" in str(getattr(e, "problem", "")):
            raise ConfigError(f"services file {path}: nested too deeply") from None
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"services file {path}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"services file {path}: nested too deeply") from None
    except DuplicateKey as e:
        raise ConfigError(f"services file {path}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ConfigError(f"services file {path}: expected a mapping with a 'services' key")
    unknown = sorted(str(k) for k in raw if k not in SECTIONS)
    if unknown:
        raise ConfigError(f"services file {path}: unknown section; the sections are {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"services file {path}: '{section}' must be a mapping")
    return raw


def _restore_refs(node: Any, refs: list[str]) -> Any:
    if isinstance(node, dict):
        if any(isinstance(k, str) and _PLACEHOLDER.search(k) for k in node):
            raise ConfigError("a ${VAR} reference may be a value only, not a key")
        return {k: _restore_refs(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_restore_refs(v, refs) for v in node]
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: refs[int(m.group(1))], node)
    return node


def interpolate(node: Any, where: str, substituted: list[tuple[str, str]] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``VAR_FILE`` stands in for
    ``VAR``. A variable that is set nowhere is left as a marker: a secret field holding it
    raises when used (:class:`~integrations.config.secrets.Secret`), any other field fails the
    file. ``substituted`` collects ``(where, value)`` of what came from the environment."""
    if isinstance(node, dict):
        return {k: interpolate(v, f"{where}.{k}", substituted) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, f"{where}[{i}]", substituted) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            value = os.environ[name]
        elif os.environ.get(name + "_FILE"):
            value = read_secret_file(os.environ[name + "_FILE"], name)
        elif default is not None:
            return default
        else:
            return unset_marker(where, name)
        if substituted is not None:
            # A reference in a path (a bot token in a base URL, as Telegram wants it) is a
            # credential; one in a scheme, host or port, or a whole value, is a setting.
            substituted.append((where + "#path" if _in_path(node[: m.start()]) else where, value))
        return value

    return _ENV_REF.sub(sub, node)


def _in_path(before: str) -> bool:
    """Whether a reference preceded by ``before`` stands in a URL's path (or a path template).
    A reference that opens the value stands for a whole origin (``${API_URL}/bot${TOKEN}``)."""
    before = _ENV_REF.sub("x", re.sub(r"^\$\{[^}]*\}", "x://x", before))
    if before.startswith("/"):
        return True
    _, scheme, rest = before.partition("://")
    return bool(scheme) and "/" in rest


def check_no_unset(model: BaseModel) -> None:
    """A variable that is not set may only stand for a secret (resolved where it is used)."""
    for value in _strings(model.model_dump(mode="python")):
        unset = unset_in(value)
        if unset is not None:
            raise ConfigError(unset_message(*unset))


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list | tuple):
        return [s for v in node for s in _strings(v)]
    return []


def entries(raw: dict[str, Any], section: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{name: (where, spec)}`` of a section, each name checked."""
    out = {}
    for name, spec in (raw.get(section) or {}).items():
        where = f"{section}.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{section}: names are lower-case letters, digits and '_', at most 63")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        out[name] = (where, spec)
    return out


def validate(model: type[_M], spec: dict[str, Any], where: str, **extra: Any) -> _M:
    try:
        obj = model.model_validate({**spec, **extra})
    except ValidationError as e:
        raise ConfigError(describe(e, prefix=where + ".")) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    check_no_unset(obj)
    return obj


def load_webhooks(path: Path) -> dict[str, WebhookSource]:
    """The incoming webhook sources of the services file (its ``webhooks:`` section)."""
    raw = read_file(path)
    return {
        name: validate(WebhookSource, interpolate(spec, where), where, name=name)
        for name, (where, spec) in entries(raw, "webhooks").items()
    }


def load_mailboxes(path: Path) -> dict[str, Mailbox]:
    """The IMAP mailboxes beat polls (the ``mailboxes:`` section of the services file)."""
    raw = read_file(path)
    return {
        name: validate(Mailbox, interpolate(spec, where), where, name=name)
        for name, (where, spec) in entries(raw, "mailboxes").items()
    }


def describe(e: ValidationError, prefix: str) -> str:
    """Name every failing field and why, without the value that was given."""
    parts = []
    for err in e.errors(include_url=False, include_input=True, include_context=True):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if err["type"] == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            field = str(ctx.get("discriminator", "type")).strip("'")
            msg = f"unknown {field}; expected one of {ctx.get('expected_tags', '')}"
        elif isinstance(given, str) and unset_in(given):
            where, name = unset_in(given) or ("", "")
            parts.append(unset_message(where, name))
            continue
        elif isinstance(given, str | int | float) and len(str(given)) >= 2 and str(given) in msg:
            msg = msg.replace(str(given), "…")
        parts.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.')}: {msg}")
    return "; ".join(parts)


@functools.cache
def get_webhooks() -> dict[str, WebhookSource]:
    return load_webhooks(get_settings().services_file)


@functools.cache
def get_mailboxes() -> dict[str, Mailbox]:
    return load_mailboxes(get_settings().services_file)


def services_settings_check(
    settings: Settings, where: str, retry_backoff_max: int, retry_after_max: int
) -> None:
    if retry_backoff_max > settings.max_countdown:
        raise ConfigError(f"{where}.retry.backoff_max: must be at most MAX_COUNTDOWN")
    if retry_after_max > settings.max_countdown:
        raise ConfigError(f"{where}.retry.retry_after_max: must be at most MAX_COUNTDOWN")
