"""The google_calendar kind through the job path, against a stand-in for Google Calendar API v3
(tests/gcal_server.py: bodies from Google's API reference) behind the test OAuth server, as the
user ``dana`` authorized it; and find_free_slot's arithmetic on its own."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from oauth_flow import connect
from sqlalchemy import select

from integrations.auth.grants import OAuth2
from integrations.config import Settings
from integrations.errors import ConfigError, InvalidParams, PermanentError
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import Job
from integrations.services import load_services
from integrations.services.google_calendar_slots import Interval, first_free_slot
from integrations.tools import definitions
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker", "oauth", "receiver")

ZURICH = ZoneInfo("Europe/Zurich")


@pytest.fixture(scope="module")
def dana(oauth: Any, receiver: str) -> str:
    name = "dana" + uuid.uuid4().hex[:6]
    connect("oauth_gcal", name, name)
    return name


def run(operation: str, params: dict[str, Any], connection: str) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay("oauth_gcal", operation, params, connection=connection).get(
        timeout=30
    )
    return out


def requests_to(oauth: Any, path: str) -> list[tuple[str, str, dict[str, str], Any]]:
    return [r for r in oauth.calendar.requests if r[1] == path]


def test_list_events_expands_recurring_events_one_page_at_a_time(oauth: Any, dana: str) -> None:
    window = {"time_min": "2026-12-01T00:00:00+01:00", "time_max": "2026-12-08T00:00:00+01:00"}
    first = run("list_events", window, dana)
    data = first["data"]
    assert data["kind"] == "calendar#events" and data["summary"] == f"{dana}@example.com"
    assert [e["summary"] for e in data["items"]] == ["Stand-up", "Stand-up"]
    assert all(e["recurringEventId"] == "7cbh8rpc10lrc0ckih9tafss99" for e in data["items"])
    (_, _, query, _) = requests_to(oauth, "/calendar/v3/calendars/primary/events")[-1]
    assert query == {
        "singleEvents": "true",
        "orderBy": "startTime",
        "maxResults": "250",
        "timeMin": "2026-12-01T00:00:00+01:00",
        "timeMax": "2026-12-08T00:00:00+01:00",
    }
    second = run("list_events", {**window, "page_token": data["nextPageToken"]}, dana)
    assert len(second["data"]["items"]) == 1 and "nextPageToken" not in second["data"]
    assert "nextSyncToken" in second["data"]


def test_insert_event_invites_the_attendees_and_asks_for_a_meet_conference(oauth: Any, dana: str) -> None:
    params = {
        "summary": "Design review",
        "description": "Agenda in the doc",
        "start": {"date_time": "2026-12-07T11:00:00+01:00", "time_zone": "Europe/Zurich"},
        "end": {"date_time": "2026-12-07T12:00:00+01:00", "time_zone": "Europe/Zurich"},
        "attendees": ["bob@example.com", "carol@example.com"],
        "conference": True,
        "send_updates": "all",
    }
    out = run("insert_event", params, dana)
    event = out["data"]
    job_hex = out["job_id"].replace("-", "")
    assert event["id"] == "ai" + job_hex and event["status"] == "confirmed"
    assert event["hangoutLink"].startswith("https://meet.google.com/")
    assert event["organizer"]["email"] == f"{dana}@example.com"
    (_, _, query, body) = requests_to(oauth, "/calendar/v3/calendars/primary/events")[-1]
    assert query == {"sendUpdates": "all", "conferenceDataVersion": "1"}
    assert body["start"] == {"dateTime": "2026-12-07T11:00:00+01:00", "timeZone": "Europe/Zurich"}
    assert body["attendees"] == [{"email": "bob@example.com"}, {"email": "carol@example.com"}]
    assert body["conferenceData"] == {
        "createRequest": {"requestId": out["job_id"], "conferenceSolutionKey": {"type": "hangoutsMeet"}}
    }


def test_an_insert_whose_answer_was_lost_is_not_made_twice(oauth: Any, dana: str) -> None:
    cal = oauth.calendar
    cal.slow_insert = 3.0  # stored, then answered after the service's 2 s timeout
    params = {"summary": "Lost answer", "start": {"date": "2026-12-09"}, "end": {"date": "2026-12-10"}}
    out = run("insert_event", params, dana)
    assert out["status"] == "succeeded" and out["attempts"] == 2
    assert out["meta"] == {"duplicate": True}
    event_id = "ai" + out["job_id"].replace("-", "")
    assert out["data"]["id"] == event_id and out["data"]["summary"] == "Lost answer"
    inserts = [r for r in requests_to(oauth, "/calendar/v3/calendars/primary/events") if r[0] == "POST"]
    assert [r[3]["id"] for r in inserts].count(event_id) == 2  # tried twice, made once
    assert sum(1 for e in cal.events if e == event_id) == 1


def test_freebusy_answers_each_calendar_or_its_error(oauth: Any, dana: str) -> None:
    oauth.calendar.busy.update(
        {
            "primary": [("2026-12-07T08:00:00Z", "2026-12-07T09:30:00Z")],
            "bob@example.com": [("2026-12-07T09:30:00Z", "2026-12-07T10:00:00Z")],
        }
    )
    out = run(
        "freebusy",
        {
            "time_min": "2026-12-07T00:00:00Z",
            "time_max": "2026-12-08T00:00:00Z",
            "calendars": ["primary", "bob@example.com", "ghost@example.com"],
        },
        dana,
    )
    cals = out["data"]["calendars"]
    assert cals["primary"]["busy"] == [{"start": "2026-12-07T08:00:00Z", "end": "2026-12-07T09:30:00Z"}]
    assert cals["ghost@example.com"]["errors"] == [{"domain": "global", "reason": "notFound"}]
    (_, _, _, body) = requests_to(oauth, "/calendar/v3/freeBusy")[-1]
    assert body["items"] == [{"id": "primary"}, {"id": "bob@example.com"}, {"id": "ghost@example.com"}]
    assert body["timeZone"] == "UTC"


def test_find_free_slot_takes_one_freebusy_query_and_keeps_to_working_hours(oauth: Any, dana: str) -> None:
    oauth.calendar.busy.update(
        {
            # Monday 7 December in Zurich (UTC+1): busy 09:00-10:30 and 10:30-11:00.
            "primary": [("2026-12-07T08:00:00Z", "2026-12-07T09:30:00Z")],
            "bob@example.com": [("2026-12-07T09:30:00Z", "2026-12-07T10:00:00Z")],
        }
    )
    before = len(oauth.calendar.requests)
    params = {
        "time_min": "2026-12-05T10:00:00+01:00",  # a Saturday: the search starts on Monday
        "time_max": "2026-12-12T00:00:00+01:00",
        "duration_minutes": 60,
        "calendars": ["primary", "bob@example.com", "ghost@example.com"],
        "time_zone": "Europe/Zurich",
        "working_hours": {"start": "09:00", "end": "17:00"},
    }
    out = run("find_free_slot", params, dana)
    assert out["data"]["slot"] == {"start": "2026-12-07T11:00:00+01:00", "end": "2026-12-07T12:00:00+01:00"}
    assert out["data"]["unavailable_calendars"] == {"ghost@example.com": ["notFound"]}
    assert out["meta"] == {"unavailable_calendars": 1}
    assert [r[1] for r in oauth.calendar.requests[before:]] == ["/calendar/v3/freeBusy"]

    none = run("find_free_slot", {**params, "duration_minutes": 600}, dana)  # longer than a working day
    assert none["data"]["slot"] is None


def test_a_rate_limit_reason_is_retried_and_not_found_is_permanent(oauth: Any, dana: str) -> None:
    cal = oauth.calendar
    path = "/calendar/v3/calendars/primary/events"
    cal.fail(path, (403, "rateLimitExceeded"))
    window = {"time_min": "2026-12-01T00:00:00Z", "time_max": "2026-12-02T00:00:00Z"}
    out = run("list_events", window, dana)
    assert out["status"] == "succeeded" and out["attempts"] == 2
    job = reads.get_job(out["job_id"], with_attempts=True)
    assert (
        job is not None and job["attempts_log"][0]["error"] == "Google Calendar: HTTP 403 rateLimitExceeded"
    )

    cal.fail("/calendar/v3/calendars/nobody@example.com/events", (404, "notFound"))
    r = call_service.delay(
        "oauth_gcal", "list_events", {**window, "calendar_id": "nobody@example.com"}, connection=dana
    )
    with pytest.raises(PermanentError, match="Google Calendar: HTTP 404 notFound"):
        r.get(timeout=30)


@pytest.mark.parametrize(
    ("operation", "params", "expected"),
    [
        (
            "list_events",
            {"time_min": "2026-12-02T00:00:00Z", "time_max": "2026-12-01T00:00:00Z"},
            "time_max: must be after",
        ),
        ("list_events", {"time_min": "2026-12-01T00:00:00"}, "time_min: must be a valid date-time"),
        ("list_events", {"time_min": "tomorrow"}, "time_min: must be a valid date-time"),
        ("list_events", {"time_zone": "Mars/Olympus"}, "time_zone: not a known IANA time zone"),
        (
            "insert_event",
            {"summary": "x", "start": {"date": "2026-12-01"}, "end": {"date_time": "2026-12-01T10:00:00Z"}},
            "end: must be a date_time when start is",
        ),
        (
            "insert_event",
            {"summary": "x", "start": {}, "end": {"date": "2026-12-01"}},
            "start: give date_time or date",
        ),
        (
            "find_free_slot",
            {
                "time_min": "2026-12-01T00:00:00Z",
                "time_max": "2026-12-02T00:00:00Z",
                "duration_minutes": 30,
                "working_hours": {"start": "17:00", "end": "09:00"},
            },
            "working_hours: end must be after start",
        ),
    ],
)
def test_bad_params_are_refused_at_submit(
    operation: str, params: dict[str, Any], expected: str, dana: str
) -> None:
    with pytest.raises(InvalidParams, match=expected):
        call_service.delay("oauth_gcal", operation, params, connection=dana)


def test_google_is_the_default_and_the_operations_are_complete_tools(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(
        "services:\n  gcal:\n    kind: google_calendar\n"
        "    auth: {client_id: my-app.apps.googleusercontent.com, client_secret: s3cret}\n"
    )
    svc = load_services(path, Settings())["gcal"]
    auth = svc.auth  # type: ignore[attr-defined]
    assert isinstance(auth, OAuth2) and auth.per_user
    assert auth.authorize_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert auth.token_url == "https://oauth2.googleapis.com/token"
    assert auth.revoke_url == "https://oauth2.googleapis.com/revoke"
    assert auth.scopes == ("https://www.googleapis.com/auth/calendar",)
    assert auth.authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert svc.base_url == "https://www.googleapis.com/calendar/v3"  # type: ignore[attr-defined]
    tools = definitions("openai", services=["oauth_gcal"])
    assert sorted(t["function"]["name"].split("__")[-1] for t in tools) == sorted(
        ["list_events", "insert_event", "freebusy", "find_free_slot"]
    )
    for tool in tools:
        for name, prop in tool["function"]["parameters"]["properties"].items():
            assert prop.get("description") or prop.get("type") == "boolean" or name in ("calendar_id",), name


def test_an_idempotency_key_is_one_end_users_own(oauth: Any, dana: str) -> None:
    erin = "erin" + uuid.uuid4().hex[:6]
    connect("oauth_gcal", erin, erin)
    key = "week-" + uuid.uuid4().hex
    window = {"time_min": "2026-12-01T00:00:00+01:00", "time_max": "2026-12-08T00:00:00+01:00"}
    first = call_service.delay("oauth_gcal", "list_events", window, idempotency_key=key, connection=dana)
    assert first.get(timeout=30)["data"]["summary"] == f"{dana}@example.com"
    # Another user's job with the same key would hand erin dana's calendar: refused, nothing written.
    with pytest.raises(InvalidParams, match="idempotency_key is already used by a job of another connection"):
        call_service.delay("oauth_gcal", "list_events", window, idempotency_key=key, connection=erin)
    assert (
        call_service.delay("oauth_gcal", "list_events", window, idempotency_key=key, connection=dana).id
        == first.id
    )
    with get_engine().connect() as conn:
        rows = conn.execute(select(Job.connection).where(Job.idempotency_key == key)).all()
    assert [r.connection for r in rows] == [dana]


def test_a_tool_of_a_per_user_service_runs_with_the_users_connection(oauth: Any, dana: str) -> None:
    from tasks.tools import run as run_tool

    arguments = '{"time_min": "2026-12-01T00:00:00+01:00", "time_max": "2026-12-08T00:00:00+01:00"}'
    call = {
        "id": "call_" + uuid.uuid4().hex[:12],
        "type": "function",
        "function": {"name": "oauth_gcal__list_events", "arguments": arguments},
    }
    without = run_tool(call, wait=20)
    assert json.loads(without["content"]) == {
        "error": "tool oauth_gcal__list_events acts for an end user: it runs with a connection"
    }
    answer = json.loads(run_tool(call, wait=20, connection=dana)["content"])
    assert answer["status"] == "succeeded" and answer["data"]["summary"] == f"{dana}@example.com"
    assert reads.get_job(answer["job_id"])["connection"] == dana  # type: ignore[index]


def test_a_per_user_service_has_no_health_check(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(
        "services:\n  gcal:\n    kind: google_calendar\n"
        "    auth: {client_id: my-app.apps.googleusercontent.com, client_secret: s3cret}\n"
        "    health: {operation: list_events, params: {}, interval: 60}\n"
    )
    with pytest.raises(ConfigError, match="a per-user service has no credential of its own") as e:
        load_services(path, Settings())
    assert "s3cret" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# find_free_slot's arithmetic
# ------------------------------------------------------------------------------------------------


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def slot(
    busy: list[tuple[str, str]],
    start: str,
    end: str,
    minutes: int = 60,
    days: tuple[int, ...] = (1, 2, 3, 4, 5),
) -> Any:
    found = first_free_slot(
        [Interval(at(a), at(b)) for a, b in busy],
        at(start),
        at(end),
        dt.timedelta(minutes=minutes),
        ZURICH,
        dt.time(9),
        dt.time(17),
        days,
        dt.timedelta(minutes=15),
    )
    return (
        None
        if found is None
        else (found.start.astimezone(ZURICH).isoformat(), found.end.astimezone(ZURICH).isoformat())
    )


def test_the_slot_starts_on_the_grid_after_overlapping_and_touching_busy_times() -> None:
    busy = [
        ("2026-12-07T09:00:00+01:00", "2026-12-07T10:10:00+01:00"),
        ("2026-12-07T10:00:00+01:00", "2026-12-07T10:40:00+01:00"),  # overlaps the first
        ("2026-12-07T11:45:00+01:00", "2026-12-07T12:30:00+01:00"),  # leaves 10:45-11:45: 60 min
    ]
    assert slot(busy, "2026-12-07T08:00:00+01:00", "2026-12-08T00:00:00+01:00") == (
        "2026-12-07T10:45:00+01:00",
        "2026-12-07T11:45:00+01:00",
    )
    assert slot(busy, "2026-12-07T08:00:00+01:00", "2026-12-08T00:00:00+01:00", minutes=75) == (
        "2026-12-07T12:30:00+01:00",
        "2026-12-07T13:45:00+01:00",
    )


def test_the_slot_keeps_to_the_search_window_the_working_days_and_the_day_end() -> None:
    assert slot([], "2026-12-07T16:30:00+01:00", "2026-12-09T00:00:00+01:00") == (
        "2026-12-08T09:00:00+01:00",
        "2026-12-08T10:00:00+01:00",
    )
    assert slot([], "2026-12-05T09:00:00+01:00", "2026-12-06T23:00:00+01:00") is None  # a weekend
    assert slot([], "2026-12-07T09:20:00+01:00", "2026-12-07T10:20:00+01:00") is None  # 9:30 + 60 > 10:20
    assert slot([], "2026-12-07T09:05:00+01:00", "2026-12-07T10:30:00+01:00") == (
        "2026-12-07T09:15:00+01:00",
        "2026-12-07T10:15:00+01:00",
    )


def test_working_hours_stay_on_the_wall_clock_across_a_daylight_saving_change() -> None:
    # Zurich moves to UTC+2 on Sunday 29 March 2026: 09:00 is then 07:00 UTC, not 08:00.
    every_day = (1, 2, 3, 4, 5, 6, 7)
    found = slot([], "2026-03-28T17:30:00+01:00", "2026-03-30T00:00:00+02:00", days=every_day)
    assert found == ("2026-03-29T09:00:00+02:00", "2026-03-29T10:00:00+02:00")
    busy = [("2026-03-29T07:00:00Z", "2026-03-29T08:00:00Z")]  # 09:00-10:00 local
    found = slot(busy, "2026-03-28T17:30:00+01:00", "2026-03-30T00:00:00+02:00", days=every_day)
    assert found == ("2026-03-29T10:00:00+02:00", "2026-03-29T11:00:00+02:00")
