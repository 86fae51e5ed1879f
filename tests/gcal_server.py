"""A stand-in for Google Calendar API v3 on the test OAuth server (tests/oauth_server.py): its
resource server checks the bearer token like Google's would, and answers with the bodies of
Google's API reference:

- events.list: https://developers.google.com/calendar/api/v3/reference/events/list
- events.insert, the Events resource: https://developers.google.com/calendar/api/v3/reference/events/insert
  and https://developers.google.com/calendar/api/v3/reference/events#resource
- events.get: https://developers.google.com/calendar/api/v3/reference/events/get
- freebusy.query: https://developers.google.com/calendar/api/v3/reference/freebusy/query
- errors: https://developers.google.com/calendar/api/guides/errors
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, cast

from flask import Flask, Response, request

#: 401 as Google answers it (the errors guide, "401: Invalid Credentials").
INVALID_CREDENTIALS = {
    "error": {
        "errors": [
            {
                "domain": "global",
                "reason": "authError",
                "message": "Invalid Credentials",
                "locationType": "header",
                "location": "Authorization",
            }
        ],
        "code": 401,
        "message": "Invalid Credentials",
    }
}


def google_error(code: int, domain: str, reason: str, message: str) -> Response:
    """An error in the form of the errors guide."""
    body = {
        "error": {
            "errors": [{"domain": domain, "reason": reason, "message": message}],
            "code": code,
            "message": message,
        }
    }
    return Response(json.dumps(body), status=code, content_type="application/json; charset=UTF-8")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json; charset=UTF-8")


class Calendar:
    """The calendars' state and what the tests programmed and saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[str, dict[str, Any]] = {}
        #: calendar id -> busy intervals (RFC 3339 strings)
        self.busy: dict[str, list[tuple[str, str]]] = {}
        #: (method, path, query, body) of every request that got past the token check
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        #: Errors to answer first, per path: (status, reason)
        self.errors: dict[str, deque[tuple[int, str]]] = {}
        #: Store the next inserted event, then answer only after this many seconds.
        self.slow_insert = 0.0

    def fail(self, path: str, *errors: tuple[int, str]) -> None:
        with self.lock:
            self.errors.setdefault(path, deque()).extend(errors)


def _event(event_id: str, body: dict[str, Any], user: str | None) -> dict[str, Any]:
    """An Events resource as events.insert answers it."""
    who = {"email": f"{user}@example.com", "self": True}
    out: dict[str, Any] = {
        "kind": "calendar#event",
        "etag": '"3181161784712000"',
        "id": event_id,
        "status": "confirmed",
        "htmlLink": f"https://www.google.com/calendar/event?eid={event_id}",
        "created": "2026-11-26T10:00:00.000Z",
        "updated": "2026-11-26T10:00:00.356Z",
        "summary": body.get("summary"),
        "creator": who,
        "organizer": who,
        "start": body["start"],
        "end": body["end"],
        "iCalUID": f"{event_id}@google.com",
        "sequence": 0,
        "reminders": {"useDefault": True},
        "eventType": "default",
    }
    for name in ("description", "location"):
        if name in body:
            out[name] = body[name]
    if body.get("attendees"):
        out["attendees"] = [{**a, "responseStatus": "needsAction"} for a in body["attendees"]]
    create = (body.get("conferenceData") or {}).get("createRequest")
    if create:
        out["hangoutLink"] = "https://meet.google.com/abc-defg-hij"
        out["conferenceData"] = {
            "createRequest": {**create, "status": {"statusCode": "success"}},
            "entryPoints": [
                {
                    "entryPointType": "video",
                    "uri": "https://meet.google.com/abc-defg-hij",
                    "label": "meet.google.com/abc-defg-hij",
                }
            ],
            "conferenceSolution": {"key": {"type": "hangoutsMeet"}, "name": "Google Meet"},
            "conferenceId": "abc-defg-hij",
        }
    return out


#: The items of events.list for the primary calendar: a recurring meeting expanded into its
#: instances (singleEvents=true), two per page.
LISTED = [
    {
        "kind": "calendar#event",
        "etag": f'"31811617847{n}"',
        "id": f"7cbh8rpc10lrc0ckih9tafss99_2026120{n}T090000Z",
        "status": "confirmed",
        "htmlLink": "https://www.google.com/calendar/event?eid=N2NiaDhycGMxMGxyYzBja2loOXRhZnNzOTk",
        "created": "2026-11-01T08:00:00.000Z",
        "updated": "2026-11-01T08:00:00.000Z",
        "summary": "Stand-up",
        "start": {"dateTime": f"2026-12-0{n}T10:00:00+01:00", "timeZone": "Europe/Zurich"},
        "end": {"dateTime": f"2026-12-0{n}T10:15:00+01:00", "timeZone": "Europe/Zurich"},
        "recurringEventId": "7cbh8rpc10lrc0ckih9tafss99",
        "originalStartTime": {"dateTime": f"2026-12-0{n}T10:00:00+01:00", "timeZone": "Europe/Zurich"},
        "iCalUID": "7cbh8rpc10lrc0ckih9tafss99@google.com",
        "sequence": 0,
        "eventType": "default",
    }
    for n in (1, 2, 3)
]


def add_calendar(app: Flask, cal: Calendar) -> None:
    protected = app.extensions["oauth_protected"]

    def record(path: str) -> Response | None:
        body = request.get_json(silent=True)
        with cal.lock:
            cal.requests.append((request.method, path, dict(request.args), body))
            planned = cal.errors.get(path)
            error = planned.popleft() if planned else None
        if error is None:
            return None
        status, reason = error
        domain = "usageLimits" if "Limit" in reason else "global"
        return google_error(status, domain, reason, reason)

    @app.get("/calendar/v3/calendars/<calendar_id>/events")
    def list_events(calendar_id: str) -> Response:
        path = f"/calendar/v3/calendars/{calendar_id}/events"

        def answer(tok: Any) -> Response:
            failed = record(path)
            if failed is not None:
                return failed
            page = request.args.get("pageToken")
            items, token = (
                (LISTED[:2], "CigKGjdjYmg4cnBjMTBscmMwY2tpaDl0YWZzczk5GAEggICA6P2o")
                if not page
                else (LISTED[2:], None)
            )
            body: dict[str, Any] = {
                "kind": "calendar#events",
                "etag": '"p33c9tb8muj7ui0o"',
                "summary": f"{tok.user}@example.com",
                "updated": "2026-11-26T09:59:00.000Z",
                "timeZone": "Europe/Zurich",
                "accessRole": "owner",
                "defaultReminders": [{"method": "popup", "minutes": 10}],
                "items": items,
            }
            if token:
                body["nextPageToken"] = token
            else:
                body["nextSyncToken"] = "CPDAlvWDx70CEPDAlvWDx70CGAU="
            return _json(body)

        return cast(Response, protected(path, answer, INVALID_CREDENTIALS))

    @app.post("/calendar/v3/calendars/<calendar_id>/events")
    def insert_event(calendar_id: str) -> Response:
        path = f"/calendar/v3/calendars/{calendar_id}/events"

        def answer(tok: Any) -> Response:
            failed = record(path)
            if failed is not None:
                return failed
            body = request.get_json()
            event_id = body.get("id")
            with cal.lock:
                if event_id in cal.events:
                    # The errors guide, "409: The requested identifier already exists".
                    return google_error(
                        409, "global", "duplicate", "The requested identifier already exists."
                    )
                cal.events[event_id] = _event(event_id, body, tok.user)
                slow, cal.slow_insert = cal.slow_insert, 0.0
            if slow:
                time.sleep(slow)  # stored, but the answer comes too late for the caller
            return _json(cal.events[event_id])

        return cast(Response, protected(path, answer, INVALID_CREDENTIALS))

    @app.get("/calendar/v3/calendars/<calendar_id>/events/<event_id>")
    def get_event(calendar_id: str, event_id: str) -> Response:
        path = f"/calendar/v3/calendars/{calendar_id}/events/{event_id}"

        def answer(tok: Any) -> Response:
            record(path)
            found = cal.events.get(event_id)
            return _json(found) if found else google_error(404, "global", "notFound", "Not Found")

        return cast(Response, protected(path, answer, INVALID_CREDENTIALS))

    @app.post("/calendar/v3/freeBusy")
    def freebusy() -> Response:
        path = "/calendar/v3/freeBusy"

        def answer(tok: Any) -> Response:
            failed = record(path)
            if failed is not None:
                return failed
            body = request.get_json()
            calendars: dict[str, Any] = {}
            for item in body.get("items", []):
                cal_id = item["id"]
                if cal_id in cal.busy:
                    calendars[cal_id] = {"busy": [{"start": s, "end": e} for s, e in cal.busy[cal_id]]}
                else:
                    calendars[cal_id] = {"errors": [{"domain": "global", "reason": "notFound"}], "busy": []}
            return _json(
                {
                    "kind": "calendar#freeBusy",
                    "timeMin": body["timeMin"],
                    "timeMax": body["timeMax"],
                    "calendars": calendars,
                }
            )

        return cast(Response, protected(path, answer, INVALID_CREDENTIALS))
