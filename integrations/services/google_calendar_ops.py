"""The google_calendar kind's events operations (``list_events``, ``insert_event``): their
parameter schemas, the checks JSON Schema cannot make, and the request each builds; with what
every operation of the kind shares (:class:`CalendarOperation`, the date-time and time zone
parameters, the calendar's path).

The freebusy operations are in :mod:`integrations.services.google_calendar_freebusy`; the
service, its defaults and Google's errors in :mod:`integrations.services.google_calendar`.
Reference: https://developers.google.com/calendar/api/v3/reference
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from integrations import http
from integrations.errors import InvalidParams
from integrations.services.base import Attempt, Operation
from integrations.services.params import object_schema

# ---- parameter schemas ---------------------------------------------------------------------

_DATETIME = {"type": "string", "format": "date-time"}
_CALENDAR_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1024,
    "description": "Calendar identifier: 'primary' for the user's main calendar, or an address "
    "such as someone@example.com.",
    "default": "primary",
}
TIME_ZONE = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "An IANA time zone name, e.g. Europe/Zurich.",
}


def dt_param(description: str) -> dict[str, Any]:
    return {
        **_DATETIME,
        "description": description + " RFC 3339 with an offset, e.g. 2026-12-01T09:00:00+01:00.",
    }


def _when(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description + " Give date_time (timed event) or date (all-day event).",
        "properties": {
            "date_time": dt_param("The time."),
            "date": {
                "type": "string",
                "format": "date",
                "description": "The date of an all-day event, YYYY-MM-DD.",
            },
            "time_zone": TIME_ZONE,
        },
        "additionalProperties": False,
    }


class CalendarOperation(Operation):
    """A built-in operation of the kind: its schema is code, its request too."""

    def request(self, base_url: str, params: dict[str, Any], attempt: Attempt) -> http.Request:
        raise NotImplementedError

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        for name in ("time_min", "time_max"):
            if name in clean:
                _parse_instant(clean[name], name)
        if (
            "time_min" in clean
            and "time_max" in clean
            and _parse_instant(clean["time_max"], "time_max") <= _parse_instant(clean["time_min"], "time_min")
        ):
            raise InvalidParams("time_max: must be after time_min")
        if "time_zone" in clean:
            parse_zone(clean["time_zone"])
        return clean


def _parse_instant(value: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidParams(f"{name}: must be an RFC 3339 date-time, e.g. 2026-12-01T09:00:00Z") from None
    if parsed.tzinfo is None:
        raise InvalidParams(f"{name}: must have a time zone offset (Z or +01:00)")
    return parsed


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidParams("time_zone: not a known IANA time zone") from None


def calendar_path(calendar_id: str) -> str:
    return "/calendars/" + quote(calendar_id, safe="@")


class ListEvents(CalendarOperation):
    description: str = (
        "List events of a calendar between two times, recurring events expanded into single "
        "events, earliest first. Returns Google's events list (items, nextPageToken)."
    )

    def build_parameters(self) -> dict[str, Any]:
        props = {
            "calendar_id": _CALENDAR_ID,
            "time_min": dt_param("Events ending after this time."),
            "time_max": dt_param("Events starting before this time."),
            "single_events": {
                "type": "boolean",
                "default": True,
                "description": "Expand recurring events into their single instances.",
            },
            "query": {"type": "string", "maxLength": 500, "description": "Free text that events must match."},
            "max_results": {
                "type": "integer",
                "minimum": 1,
                "maximum": 2500,
                "default": 250,
                "description": "Events per page at most.",
            },
            "page_token": {
                "type": "string",
                "maxLength": 2048,
                "description": "nextPageToken of the previous page.",
            },
            "time_zone": {**TIME_ZONE, "description": "Time zone of the times in the answer (IANA name)."},
        }
        return object_schema(props, [], self.description)

    def request(self, base_url: str, params: dict[str, Any], attempt: Attempt) -> http.Request:
        single = params.get("single_events", True)
        query: dict[str, Any] = {
            "singleEvents": "true" if single else "false",
            "maxResults": params.get("max_results", 250),
        }
        if single:
            query["orderBy"] = "startTime"  # only allowed with singleEvents
        for ours, theirs in (
            ("time_min", "timeMin"),
            ("time_max", "timeMax"),
            ("query", "q"),
            ("page_token", "pageToken"),
            ("time_zone", "timeZone"),
        ):
            if ours in params:
                query[theirs] = params[ours]
        path = calendar_path(params.get("calendar_id", "primary")) + "/events"
        return http.Request("GET", base_url + path, params=query)


class InsertEvent(CalendarOperation):
    description: str = (
        "Create an event in a calendar, with attendees (invited by e-mail when send_updates says "
        "so) and a Google Meet link when conference is true. Returns the event."
    )

    def build_parameters(self) -> dict[str, Any]:
        props = {
            "calendar_id": _CALENDAR_ID,
            "summary": {
                "type": "string",
                "minLength": 1,
                "maxLength": 1024,
                "description": "The event's title.",
            },
            "description": {"type": "string", "maxLength": 8192, "description": "Notes of the event."},
            "location": {"type": "string", "maxLength": 1024, "description": "Where the event takes place."},
            "start": _when("When the event starts."),
            "end": _when("When the event ends."),
            "attendees": {
                "type": "array",
                "maxItems": 100,
                "description": "People invited, by e-mail address.",
                "items": {"type": "string", "format": "email", "minLength": 3, "maxLength": 320},
            },
            "conference": {
                "type": "boolean",
                "default": False,
                "description": "Add a Google Meet video conference to the event.",
            },
            "send_updates": {
                "type": "string",
                "enum": ["all", "externalOnly", "none"],
                "default": "none",
                "description": "Whom Google e-mails about the new event.",
            },
        }
        return object_schema(props, ["summary", "start", "end"], self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        kinds = []
        for name in ("start", "end"):
            when = clean[name]
            if ("date_time" in when) == ("date" in when):
                raise InvalidParams(f"{name}: give date_time or date, one of them")
            if "date_time" in when:
                _parse_instant(when["date_time"], f"{name}.date_time")
            else:
                try:
                    dt.date.fromisoformat(when["date"])
                except ValueError:
                    raise InvalidParams(f"{name}.date: must be YYYY-MM-DD") from None
            if "time_zone" in when:
                parse_zone(when["time_zone"])
            kinds.append("date_time" in when)
        if kinds[0] != kinds[1]:
            raise InvalidParams("end: must be a date_time when start is, a date when start is")
        return clean

    @staticmethod
    def event_id(attempt: Attempt) -> str:
        """The event's id, the same on every attempt of a job: Google's ids are base32hex
        (a-v, 0-9), 5 to 1024 characters, and a job id's hex digits are among them."""
        return "ai" + attempt.job_id.replace("-", "").lower()

    def request(self, base_url: str, params: dict[str, Any], attempt: Attempt) -> http.Request:
        body: dict[str, Any] = {"id": self.event_id(attempt), "summary": params["summary"]}
        for name in ("description", "location"):
            if name in params:
                body[name] = params[name]
        for name in ("start", "end"):
            when = params[name]
            body[name] = {
                {"date_time": "dateTime", "date": "date", "time_zone": "timeZone"}[k]: v
                for k, v in when.items()
            }
        if params.get("attendees"):
            body["attendees"] = [{"email": a} for a in params["attendees"]]
        query: dict[str, Any] = {"sendUpdates": params.get("send_updates", "none")}
        if params.get("conference"):
            # requestId makes the conference request idempotent too.
            body["conferenceData"] = {
                "createRequest": {
                    "requestId": attempt.job_id,
                    "conferenceSolutionKey": {"type": "hangoutsMeet"},
                }
            }
            query["conferenceDataVersion"] = 1
        path = calendar_path(params.get("calendar_id", "primary")) + "/events"
        return http.Request("POST", base_url + path, params=query, json=body)
