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

The operations' schemas and requests are in :mod:`integrations.services.google_calendar_ops`
(events) and :mod:`integrations.services.google_calendar_freebusy` (free/busy).

Errors are mapped in one place (:meth:`GoogleCalendarService.interpret`), after Google's guide
(https://developers.google.com/calendar/api/guides/errors): 403 ``rateLimitExceeded`` /
``userRateLimitExceeded`` and 429 are rate limits (retried with backoff), 5xx transient,
every other status permanent, with Google's reason in the message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from integrations import http
from integrations.config import get_settings
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.services.base import Attempt, Operation, Outcome
from integrations.services.google_calendar_freebusy import FindFreeSlot, FreeBusy
from integrations.services.google_calendar_ops import (
    CalendarOperation,
    InsertEvent,
    ListEvents,
    calendar_path,
)
from integrations.services.http_service import HttpService

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
            path = calendar_path(params.get("calendar_id", "primary")) + "/events/" + op.event_id(attempt)
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
