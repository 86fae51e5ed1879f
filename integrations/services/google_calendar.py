"""Google Calendar: events and free/busy of an end user's calendars, through the user's own
OAuth connection.

::

    services:
      gcal:
        kind: google_calendar
        auth: {client_id: "${GOOGLE_CLIENT_ID}", client_secret: "${GOOGLE_CLIENT_SECRET}"}
        connection_rate_limit: 5/s      # each user's own quota

Per-user ``oauth2`` with Google's endpoints, the calendar scope, ``access_type=offline`` and
``prompt=consent`` (so Google issues a refresh token) as defaults; each may be overridden, and
``auth: {type: oauth2_jwt_bearer, ...}`` uses a service account with domain-wide delegation
instead (``subject_from_connection: true``: each connection names the user).

Operations (https://developers.google.com/calendar/api/v3/reference):

- ``list_events``: ``GET /calendars/{calendarId}/events``, recurring events expanded into
  single events by default, one page at a time (``page_token``);
- ``insert_event``: ``POST /calendars/{calendarId}/events``, with attendees and a Google Meet
  conference on request. The event's id is derived from the job's, so a retry after a lost
  answer finds the event made before (409 ``duplicate``) and returns it instead of a second one;
- ``freebusy``: ``POST /freeBusy`` for up to 50 calendars;
- ``find_free_slot``: one ``freebusy`` query, then the first free slot of a given length inside
  working hours in a time zone, computed here.

Errors are mapped in one place (:meth:`GoogleCalendarService.interpret`), after Google's guide
(https://developers.google.com/calendar/api/guides/errors): 403 ``rateLimitExceeded`` /
``userRateLimitExceeded`` and 429 are rate limits (retried with backoff), 5xx transient,
every other status permanent, with Google's reason in the message.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import model_validator

from integrations import http
from integrations.config import get_settings
from integrations.errors import CallError, InvalidParams, PermanentError, RateLimited, TransientError
from integrations.services.base import Attempt, Operation, Outcome
from integrations.services.google_calendar_slots import Interval, first_free_slot
from integrations.services.http_service import HttpService
from integrations.services.params import object_schema

GOOGLE_OAUTH2: dict[str, Any] = {
    "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
    "token_url": "https://oauth2.googleapis.com/token",
    "revoke_url": "https://oauth2.googleapis.com/revoke",
    "scopes": ["https://www.googleapis.com/auth/calendar"],
    # A refresh token, every time the user consents:
    # https://developers.google.com/identity/protocols/oauth2/web-server#offline
    "authorize_params": {"access_type": "offline", "prompt": "consent"},
    "client_auth": "post",
}
GOOGLE_JWT_BEARER: dict[str, Any] = {
    "token_url": "https://oauth2.googleapis.com/token",
    "scopes": ["https://www.googleapis.com/auth/calendar"],
}
#: Google's reasons for "slow down" (https://developers.google.com/calendar/api/guides/errors).
RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
CALENDARS_MAX = 50

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
_TIME_ZONE = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "An IANA time zone name, e.g. Europe/Zurich.",
}


def _dt_param(description: str) -> dict[str, Any]:
    return {
        **_DATETIME,
        "description": description + " RFC 3339 with an offset, e.g. 2026-12-01T09:00:00+01:00.",
    }


def _when(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description + " Give date_time (timed event) or date (all-day event).",
        "properties": {
            "date_time": _dt_param("The time."),
            "date": {
                "type": "string",
                "format": "date",
                "description": "The date of an all-day event, YYYY-MM-DD.",
            },
            "time_zone": _TIME_ZONE,
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
            _zone(clean["time_zone"])
        return clean


def _parse_instant(value: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidParams(f"{name}: must be an RFC 3339 date-time, e.g. 2026-12-01T09:00:00Z") from None
    if parsed.tzinfo is None:
        raise InvalidParams(f"{name}: must have a time zone offset (Z or +01:00)")
    return parsed


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidParams("time_zone: not a known IANA time zone") from None


def _calendar_path(calendar_id: str) -> str:
    return "/calendars/" + quote(calendar_id, safe="@")


class ListEvents(CalendarOperation):
    description: str = (
        "List events of a calendar between two times, recurring events expanded into single "
        "events, earliest first. Returns Google's events list (items, nextPageToken)."
    )

    def build_parameters(self) -> dict[str, Any]:
        props = {
            "calendar_id": _CALENDAR_ID,
            "time_min": _dt_param("Events ending after this time."),
            "time_max": _dt_param("Events starting before this time."),
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
            "time_zone": {**_TIME_ZONE, "description": "Time zone of the times in the answer (IANA name)."},
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
        path = _calendar_path(params.get("calendar_id", "primary")) + "/events"
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
                _zone(when["time_zone"])
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
        path = _calendar_path(params.get("calendar_id", "primary")) + "/events"
        return http.Request("POST", base_url + path, params=query, json=body)


def _freebusy_props(description: str) -> dict[str, dict[str, Any]]:
    return {
        "time_min": _dt_param(f"Start of the {description}."),
        "time_max": _dt_param(f"End of the {description}."),
        "calendars": {
            "type": "array",
            "minItems": 1,
            "maxItems": CALENDARS_MAX,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": 1024},
            "default": ["primary"],
            "description": "Calendars to look at: 'primary' or addresses.",
        },
        "time_zone": {**_TIME_ZONE, "default": "UTC"},
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
        zone = _zone(params.get("time_zone", "UTC"))
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


OPERATIONS: dict[str, CalendarOperation] = {
    "list_events": ListEvents(),
    "insert_event": InsertEvent(),
    "freebusy": FreeBusy(),
    "find_free_slot": FindFreeSlot(),
}


class GoogleCalendarService(HttpService):
    kind: Literal["google_calendar"] = "google_calendar"
    base_url: str = "https://www.googleapis.com/calendar/v3"

    health_path_allowed: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _google_defaults(cls, data: Any) -> Any:
        """Google's endpoints and the calendar scope unless the file says otherwise; the auth
        type is ``oauth2`` when not given."""
        if not isinstance(data, dict) or not isinstance(data.get("auth"), dict):
            return data
        auth = dict(data["auth"])
        kind = auth.setdefault("type", "oauth2")
        defaults = {"oauth2": GOOGLE_OAUTH2, "oauth2_jwt_bearer": GOOGLE_JWT_BEARER}.get(kind, {})
        return {**data, "auth": {**defaults, **auth}}

    def catalog(self) -> Mapping[str, Operation]:
        return OPERATIONS

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, CalendarOperation)
        resp = self.send(op.request(self.base_url, params, attempt), attempt.connection)
        if isinstance(op, InsertEvent) and resp.status_code == 409 and _reason(resp) == "duplicate":
            # This job's event was made by an earlier attempt whose answer was lost: return it.
            path = _calendar_path(params.get("calendar_id", "primary")) + "/events/" + op.event_id(attempt)
            again = self.interpret(
                self.send(http.Request("GET", self.base_url + path), attempt.connection), op
            )
            return replace(again, meta={"duplicate": True})
        out = self.interpret(resp, op)
        if isinstance(op, FindFreeSlot):
            found = op.slot(params, out.data)
            meta = (
                {"unavailable_calendars": len(found["unavailable_calendars"])}
                if found["unavailable_calendars"]
                else {}
            )
            limit = get_settings().ledger_body_max_bytes
            return Outcome(
                data=found,
                status_code=out.status_code,
                latency_ms=out.latency_ms,
                excerpt=json.dumps(found)[:limit] if limit else None,
                meta=meta,
            )
        return out

    def interpret(self, resp: http.Response, op: Operation | None) -> Outcome:
        """Google's errors (https://developers.google.com/calendar/api/guides/errors): a 403
        that says rateLimitExceeded or userRateLimitExceeded is a rate limit like 429; the
        reason goes in the message."""
        if 200 <= resp.status_code < 300:
            return super().interpret(resp, op)
        reason = _reason(resp)
        excerpt = resp.excerpt(get_settings().ledger_body_max_bytes)
        message = f"Google Calendar: HTTP {resp.status_code} {reason or resp.reason}".rstrip()
        general = http.classify(resp, self.retry.retry_after_max)
        err: CallError
        if resp.status_code == 403 and reason in RATE_REASONS:
            asked = _retry_after(resp)
            cap = self.retry.retry_after_max
            err = RateLimited(
                message, status_code=403, retry_after=None if asked is None else min(asked, cap)
            )
        elif isinstance(general, RateLimited):  # 429, 503
            err = RateLimited(message, status_code=resp.status_code, retry_after=general.retry_after)
        elif isinstance(general, TransientError):
            err = TransientError(message, status_code=resp.status_code)
        else:
            err = PermanentError(message, status_code=resp.status_code)
        raise self.enrich(err, resp, excerpt, None)

    def describe(self) -> str:
        return f"google_calendar, {self.base_url}, auth {self.auth.type}"


def _reason(resp: http.Response) -> str | None:
    """Google's error reason (``error.errors[0].reason``), or its ``error.status``."""
    try:
        error = json.loads(resp.body).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    errors = error.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = errors[0].get("reason")
        if isinstance(reason, str) and reason.isalnum():
            return reason
    status = error.get("status")
    return status if isinstance(status, str) and status.replace("_", "").isalnum() else None


def _retry_after(resp: http.Response) -> float | None:
    return http.parse_retry_after(resp.headers.get("retry-after"))
