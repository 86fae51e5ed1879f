"""Secrets in the services file: ``${VAR}`` references read from the environment (or from the
file ``VAR_FILE`` names), resolved where they are used.

A process reads the whole services file, but needs only its own secrets: the receiver needs the
webhook secrets and no service token, Flower needs none. A reference to a variable that is not
set therefore does not stop the file from loading; it becomes a :class:`Secret` that raises
:class:`~integrations.errors.ConfigError` (naming the field and the variable) when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from integrations import redact
from integrations.errors import ConfigError

#: Stands in for an unset variable while the file is validated: ``\x00{where}\x1f{NAME}\x00``.
_UNSET_START, _UNSET_SEP, _UNSET_END = "\x00", "\x1f", "\x00"


def unset_marker(where: str, name: str) -> str:
    return f"{_UNSET_START}{where}{_UNSET_SEP}{name}{_UNSET_END}"


def unset_in(value: str) -> tuple[str, str] | None:
    """``(where, NAME)`` of the first unset variable marked in ``value``, if any."""
    start = value.find(_UNSET_START)
    if start < 0:
        return None
    end = value.find(_UNSET_END, start + 1)
    where, _, name = value[start + 1 : end].partition(_UNSET_SEP)
    return where, name


def unset_message(where: str, name: str) -> str:
    return f"{where}: environment variable {name} is not set (nor {name}_FILE)"


def read_secret_file(file_name: str, name: str) -> str:
    try:
        return Path(file_name).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{name}_FILE: cannot read the file it names ({e.strerror})") from None


class Secret:
    """A credential: never shown by ``repr``, ``str`` or a dump; :meth:`get` gives the value.

    A secret whose variable is not set in this process raises :class:`ConfigError` from
    :meth:`get`; :attr:`available` says whether it would.
    """

    __slots__ = ("_missing", "_value")

    def __init__(self, value: str | None, missing: tuple[str, str] | None = None) -> None:
        self._value = value
        self._missing = missing
        if value is not None:
            redact.register(value)

    @property
    def available(self) -> bool:
        return self._missing is None

    def get(self) -> str:
        if self._missing is not None:
            raise ConfigError(unset_message(*self._missing))
        assert self._value is not None
        return self._value

    #: The name pydantic's ``SecretStr`` uses, for code written against it.
    get_secret_value = get

    def __repr__(self) -> str:
        return "Secret('**********')" if self.available else "Secret(<unset>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._value, self._missing) == (other._value, other._missing)

    def __hash__(self) -> int:
        return hash((self._value, self._missing))

    @classmethod
    def _validate(cls, value: Any) -> Secret:
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a string")
        unset = unset_in(value)
        if unset is not None:
            return cls(None, unset)
        return cls(value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _: "**********"),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "writeOnly": True, "format": "password"}


def non_empty(secret: Secret) -> Secret:
    """An ``AfterValidator``: a set secret must not be blank (an empty key is anyone's key)."""
    if secret.available and not secret.get().strip():
        raise ValueError("must not be empty")
    return secret
