"""Spans of time as operators write them: ``90s``, ``30m``, ``1h``, ``7d``, ``2w``."""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Longer than any ledger is kept, and within what dates can hold when subtracted from today.
LONGEST = dt.timedelta(days=100 * 366)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)


def parse_duration(text: str) -> dt.timedelta:
    """``"30m"`` as 30 minutes: a positive number and one unit (s, m, h, d or w).

    Raises ``ValueError`` naming the accepted form.
    """
    m = _DURATION.fullmatch(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError("must be a positive number and a unit: s, m, h, d or w (e.g. 30m, 7d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if seconds > LONGEST.total_seconds():
        raise ValueError("must be at most 100 years")
    return dt.timedelta(seconds=seconds)


def format_duration(span: dt.timedelta) -> str:
    """``span`` in the largest unit that divides it: ``30d``, ``90m``, ``45s``."""
    seconds = span.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
