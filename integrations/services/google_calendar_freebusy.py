"""The google_calendar kind's freebusy operations: ``freebusy`` (Google's ``POST /freeBusy``
for up to 50 calendars) and ``find_free_slot`` (one such query, then the first free slot worked
out by :mod:`integrations.services.google_calendar_slots`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from integrations import http
from integrations.errors import InvalidParams, PermanentError
from integrations.services.base import Attempt
from integrations.services.google_calendar_ops import TIME_ZONE, CalendarOperation, dt_param, parse_zone
from integrations.services.google_calendar_slots import Interval, first_free_slot
from integrations.services.params import object_schema

CALENDARS_MAX = 50


def _freebusy_props(description: str) -> dict[str, dict[str, Any]]:
    return {
        "time_min": dt_param(f"Start of the {description}."),
        "time_max": dt_param(f"End of the {description}."),
        "calendars": {
            "type": "array",
            "minItems": 1,
            "maxItems": CALENDARS_MAX,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": 1024},
            "default": ["primary"],
            "description": "Calendars to look at: 'primary' or addresses.",
        },
        "time_zone": {**TIME_ZONE, "default": "UTC"},
    }


def _freebusy_request(base_url: str, params: dict[str, Any]) -> http.Request:
    body = {
        "timeMin": params["time_min"],
        "timeMax": params["time_max"],
        "timeZone": params.get("time_zone", "UTC"),
        "items": [{"id": c} for c in params.get("calendars", ["primary"])],
    }
    return http.Request("POST", base_url + "/freeBusy", json=body)


class FreeBusy(CalendarOperation):
    description: str = (
        "When calendars are busy between two times. Returns Google's answer: for each calendar, "
        "its busy intervals or its errors."
    )

    def build_parameters(self) -> dict[str, Any]:
        return object_schema(_freebusy_props("period"), ["time_min", "time_max"], self.description)

    def request(self, base_url: str, params: dict[str, Any], attempt: Attempt) -> http.Request:
        return _freebusy_request(base_url, params)


class FindFreeSlot(CalendarOperation):
    description: str = (
        "The first free slot of a given length, inside working hours in a time zone, when every "
        "calendar given is free. Returns slot {start, end} (null when there is none)."
    )

    def build_parameters(self) -> dict[str, Any]:
        props = {
            **_freebusy_props("search"),
            "duration_minutes": {
                "type": "integer",
                "minimum": 5,
                "maximum": 1440,
                "description": "How long the slot must be, in minutes.",
            },
            "working_hours": {
                "type": "object",
                "description": "The day's working hours in time_zone, HH:MM to HH:MM.",
                "properties": {
                    "start": {
                        "type": "string",
                        "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$",
                        "default": "09:00",
                    },
                    "end": {
                        "type": "string",
                        "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$",
                        "default": "17:00",
                    },
                },
                "additionalProperties": False,
            },
            "working_days": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 7},
                "minItems": 1,
                "uniqueItems": True,
                "default": [1, 2, 3, 4, 5],
                "description": "Days a slot may be on: 1 is Monday, 7 is Sunday.",
            },
            "granularity_minutes": {
                "type": "integer",
                "enum": [5, 10, 15, 30, 60],
                "default": 15,
                "description": "Slots start on multiples of this many minutes from the day's start.",
            },
        }
        return object_schema(props, ["time_min", "time_max", "duration_minutes"], self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        hours = clean.get("working_hours", {})
        if hours.get("start", "09:00") >= hours.get("end", "17:00"):
            raise InvalidParams("working_hours: end must be after start")
        return clean

    def request(self, base_url: str, params: dict[str, Any], attempt: Attempt) -> http.Request:
        return _freebusy_request(base_url, params)

    def slot(self, params: dict[str, Any], answer: Any) -> dict[str, Any]:
        """The first free slot in a freebusy answer."""
        calendars = answer.get("calendars") if isinstance(answer, dict) else None
        if not isinstance(calendars, dict):
            raise PermanentError("Google Calendar's freebusy answer has no calendars")
        busy: list[Interval] = []
        unavailable: dict[str, list[str]] = {}
        for cal_id, cal in calendars.items():
            errors = cal.get("errors") or []
            if errors:
                unavailable[cal_id] = [str(e.get("reason", "unknown")) for e in errors if isinstance(e, dict)]
            for b in cal.get("busy") or []:
                try:
                    busy.append(
                        Interval(dt.datetime.fromisoformat(b["start"]), dt.datetime.fromisoformat(b["end"]))
                    )
                except (KeyError, TypeError, ValueError):
                    raise PermanentError(
                        "Google Calendar's freebusy answer has a malformed interval"
                    ) from None
        zone = parse_zone(params.get("time_zone", "UTC"))
        hours = params.get("working_hours", {})
        found = first_free_slot(
            busy,
            dt.datetime.fromisoformat(params["time_min"]),
            dt.datetime.fromisoformat(params["time_max"]),
            dt.timedelta(minutes=params["duration_minutes"]),
            zone,
            dt.time.fromisoformat(hours.get("start", "09:00")),
            dt.time.fromisoformat(hours.get("end", "17:00")),
            params.get("working_days", [1, 2, 3, 4, 5]),
            dt.timedelta(minutes=params.get("granularity_minutes", 15)),
        )
        return {
            "slot": None
            if found is None
            else {
                "start": found.start.astimezone(zone).isoformat(),
                "end": found.end.astimezone(zone).isoformat(),
            },
            "time_zone": zone.key,
            "busy_intervals": len(busy),
            # A calendar Google could not read was not looked at: the slot may clash with it.
            "unavailable_calendars": unavailable,
        }
