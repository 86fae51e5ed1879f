"""The first free slot of a given length inside working hours, from busy intervals: the
arithmetic of ``find_free_slot``, free of HTTP.

Instants are compared in UTC; working hours are wall-clock times of one time zone, so a day
that changes to or from daylight saving time keeps its 09:00 to 17:00.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Interval:
    start: dt.datetime
    end: dt.datetime


def merged(busy: Iterable[Interval]) -> list[Interval]:
    """``busy`` sorted, with overlapping or touching intervals joined."""
    out: list[Interval] = []
    for b in sorted((b for b in busy if b.end > b.start), key=lambda b: b.start):
        if out and b.start <= out[-1].end:
            if b.end > out[-1].end:
                out[-1] = Interval(out[-1].start, b.end)
        else:
            out.append(b)
    return out


def first_free_slot(
    busy: Sequence[Interval],
    time_min: dt.datetime,
    time_max: dt.datetime,
    duration: dt.timedelta,
    zone: ZoneInfo,
    day_start: dt.time,
    day_end: dt.time,
    weekdays: Iterable[int],
    granularity: dt.timedelta,
) -> Interval | None:
    """The earliest ``[start, start + duration)`` within ``[time_min, time_max]``, inside the
    working hours ``day_start`` to ``day_end`` of a weekday in ``weekdays`` (ISO: Monday is 1)
    in ``zone``, that overlaps no busy interval; its start on a multiple of ``granularity``
    from the day's start. ``None`` when there is none."""
    days = set(weekdays)
    blocks = merged(busy)
    day = time_min.astimezone(zone).date()
    last = time_max.astimezone(zone).date()
    while day <= last:
        if day.isoweekday() in days:
            opens = dt.datetime.combine(day, day_start, zone).astimezone(dt.UTC)
            closes = dt.datetime.combine(day, day_end, zone).astimezone(dt.UTC)
            lo, hi = max(opens, time_min.astimezone(dt.UTC)), min(closes, time_max.astimezone(dt.UTC))
            start = _align(lo, opens, granularity)
            for b in blocks:
                if start + duration > hi:
                    break
                if b.end <= start:
                    continue
                if b.start >= start + duration:
                    break  # the gap before this block is long enough
                start = _align(b.end, opens, granularity)
            if start + duration <= hi:
                return Interval(start, start + duration)
        day += dt.timedelta(days=1)
    return None


def _align(t: dt.datetime, origin: dt.datetime, step: dt.timedelta) -> dt.datetime:
    """``t`` rounded up to ``origin`` plus a whole number of ``step``."""
    if t <= origin:
        return origin
    steps = math.ceil((t - origin) / step - 1e-9)
    return origin + steps * step
