"""The slack kind through the job path, against the Slack stand-in of tests/slack_server.py.

Each operation's success; every class of Slack's errors reaching its outcome (retried, the
method paused on every worker, permanent naming the missing scope); pagination by cursor; the
two-step upload whose upload host never sees the bot token; the per-channel and per-method
limits held across two worker nodes; the health check and ``integrations call --wait``.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SLACK_BOT_TOKEN, most_in_window
from jsonschema import Draft202012Validator
from procs import ROOT, cli, python, wait_for
from slack_server import Call, Reply, SlackStandIn, error
from test_faults import count_lines, redis_server, stack_env, wait_terminal, worker_nodes

from integrations import coordination, health
from integrations.config.loading import validate
from integrations.errors import ConfigError, InvalidParams, PermanentError
from integrations.ledger import reads
from integrations.services import Scope, get_services
from integrations.services.slack import SlackService
from integrations.ssrf import BlockedAddress
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker", "slack")

SERVICES_FILE = ROOT / "tests" / "services.yaml"
TRANSIENT = ["internal_error", "fatal_error", "service_unavailable", "request_timeout"]


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackStandIn]:
    server = SlackStandIn(SLACK_BOT_TOKEN, int(os.environ["SLACK_PORT"]), int(os.environ["SLACK_FILES_PORT"]))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def channel() -> str:
    """A channel of the test's own, so it sees only its own calls."""
    return "C" + uuid.uuid4().hex[:10].upper()


def run(service: str, operation: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay(service, operation, params).get(timeout=40)
    return out


def fails(service: str, operation: str, **params: Any) -> tuple[PermanentError, dict[str, Any]]:
    """Submit a job that must fail permanently; its error and its ledger row."""
    result = call_service.delay(service, operation, params)
    with pytest.raises(PermanentError) as e:
        result.get(timeout=40)
    return e.value, job_of(result.id)


def job_of(job_id: str) -> dict[str, Any]:
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None
    return job


def only(calls: list[Call]) -> Call:
    assert len(calls) == 1, [c.method for c in calls]
    return calls[0]


# ---- operations -------------------------------------------------------------------------------


def test_post_message_sends_json_with_its_charset_and_the_bot_token(
    slack: SlackStandIn, channel: str
) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "Hello *world*"}}]
    out = run(
        "slack", "post_message", channel=channel, text="Hello", blocks=blocks, thread_ts="1503435956.000247"
    )

    call = only(slack.calls_of("chat.postMessage", channel=channel))
    assert (call.http_method, call.headers["content-type"]) == ("POST", "application/json; charset=utf-8")
    assert call.headers["authorization"] == f"Bearer {SLACK_BOT_TOKEN}"
    assert json.loads(call.body) == {
        "channel": channel,
        "text": "Hello",
        "blocks": blocks,
        "thread_ts": "1503435956.000247",
    }
    assert (out["status"], out["status_code"]) == ("succeeded", 200)
    assert out["data"] == call.answer  # Slack's answer, as it came
    assert (out["data"]["ok"], out["data"]["channel"], out["data"]["message"]["text"]) == (
        True,
        channel,
        "Hello",
    )
    # No response_metadata.warnings: Slack warns of a JSON body without its charset.
    assert out["meta"] == {"method": "chat.postMessage"}
    row = job_of(out["job_id"])
    assert row["meta"] == {"method": "chat.postMessage"}
    assert SLACK_BOT_TOKEN not in json.dumps([out, row], default=str)


def test_update_message_and_add_reaction_act_on_a_posted_message(slack: SlackStandIn, channel: str) -> None:
    ts = run("slack", "post_message", channel=channel, text="first draft")["data"]["ts"]

    updated = run("slack", "update_message", channel=channel, ts=ts, text="second draft")["data"]
    assert (updated["ok"], updated["ts"], updated["text"]) == (True, ts, "second draft")
    reacted = run("slack", "add_reaction", channel=channel, timestamp=ts, name="thumbsup")
    assert reacted["data"] == {"ok": True}
    for method in ("chat.update", "reactions.add"):
        call = only(slack.calls_of(method, channel=channel))
        assert call.headers["content-type"] == "application/json; charset=utf-8"

    # Slack's own refusal, permanent, its code in the message and on the job.
    err, row = fails("slack", "add_reaction", channel=channel, timestamp=ts, name="thumbsup")
    assert str(err) == "slack reactions.add: already_reacted"
    assert (row["status"], row["attempts"], row["status_code"]) == ("failed", 1, 200)
    assert row["meta"] == {"method": "reactions.add", "error": "already_reacted"}


def test_lookup_user_by_email_is_a_get_with_the_email_in_the_query(slack: SlackStandIn) -> None:
    email = "spengler@ghostbusters.example.com"
    user = run("slack", "lookup_user_by_email", email=email)["data"]["user"]
    assert (user["id"], user["profile"]["email"]) == ("W012A3CDE", email)
    call = slack.calls_of("users.lookupByEmail", email=email)[-1]
    assert (call.http_method, call.body) == ("GET", b"")

    err, _ = fails("slack", "lookup_user_by_email", email="nobody@example.com")
    assert str(err) == "slack users.lookupByEmail: users_not_found"
    with pytest.raises(InvalidParams, match="email: must be a valid email"):
        call_service.delay("slack", "lookup_user_by_email", {"email": "not an address"})


def test_conversation_history_pages_by_cursor_newest_first(slack: SlackStandIn, channel: str) -> None:
    seeded = slack.seed(channel, 7)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        page = run("slack", "conversation_history", channel=channel, limit=3, cursor=cursor)["data"]
        seen += [m["ts"] for m in page["messages"]]
        cursor = page["response_metadata"]["next_cursor"] or None
        if cursor is None:
            break
    assert seen == list(reversed(seeded))  # every message once, newest first
    calls = slack.calls_of("conversations.history", channel=channel)
    assert len(calls) == 3 and all(c.http_method == "GET" and not c.body for c in calls)
    assert [c.args.get("cursor") is not None for c in calls] == [False, True, True]
    assert all(c.args["limit"] == "3" for c in calls)

    err, row = fails("slack", "conversation_history", channel=channel + "X")
    assert str(err) == "slack conversations.history: channel_not_found"
    assert row["meta"] == {"method": "conversations.history", "error": "channel_not_found"}


def test_list_conversations_pages_through_the_types_asked_for(slack: SlackStandIn) -> None:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params: dict[str, Any] = {"types": ["public_channel", "mpim"], "limit": 1}
        page = run("slack", "list_conversations", **params, **({"cursor": cursor} if cursor else {}))["data"]
        ids += [c["id"] for c in page["channels"]]
        cursor = page["response_metadata"]["next_cursor"] or None
        if cursor is None:
            break
    assert ids == ["C012AB3CD", "C061EG9T2", "G0AKFJBEU"]
    assert {c.args["types"] for c in slack.calls_of("conversations.list", limit="1")} == {
        "public_channel,mpim"
    }
    # Slack's default: public channels only.
    default = run("slack", "list_conversations")["data"]["channels"]
    assert [c["name"] for c in default] == ["general", "random"]
    with pytest.raises(InvalidParams, match=r"types\.0: must be one of"):
        call_service.delay("slack", "list_conversations", {"types": ["dm"]})


# ---- upload_file ------------------------------------------------------------------------------


def test_upload_file_sends_the_bytes_to_the_upload_host_without_the_bot_token(
    slack: SlackStandIn, channel: str
) -> None:
    payload = bytes(range(256)) * 40
    before = len(slack.uploads)
    out = run(
        "slack",
        "upload_file",
        filename="report.bin",
        content=base64.b64encode(payload).decode(),
        encoding="base64",
        title="The report",
        channel_id=channel,
        initial_comment="Here it is",
        thread_ts="1524523204.000192",
    )

    [upload] = slack.uploads[before:]
    assert upload.body == payload
    assert "authorization" not in upload.headers
    assert not any(SLACK_BOT_TOKEN in v for v in upload.headers.values())
    ticket = only(
        slack.calls_of("files.getUploadURLExternal", filename="report.bin", length=str(len(payload)))
    )
    assert (ticket.http_method, ticket.headers["content-type"]) == (
        "POST",
        "application/x-www-form-urlencoded",
    )
    assert ticket.headers["authorization"] == f"Bearer {SLACK_BOT_TOKEN}"
    file_id = ticket.answer["file_id"]
    done = only(slack.calls_of("files.completeUploadExternal", channel_id=channel))
    assert json.loads(done.body) == {
        "files": [{"id": file_id, "title": "The report"}],
        "channel_id": channel,
        "initial_comment": "Here it is",
        "thread_ts": "1524523204.000192",
    }
    assert upload.at < done.at  # completed after the bytes arrived
    assert out["data"] == {"ok": True, "files": [{"id": file_id, "title": "The report"}]}
    assert out["meta"] == {"method": "files.completeUploadExternal", "file_id": file_id}
    # The upload URL is a credential while it lasts: nowhere in the result or the ledger.
    stored = json.dumps([out, job_of(out["job_id"])], default=str)
    assert ticket.answer["upload_url"] not in stored and "/upload/v1/" not in stored

    text = run("slack", "upload_file", filename="notes.txt", content="héllo")  # private: no channel
    assert slack.uploads[-1].body == "héllo".encode()
    assert text["data"]["files"][0]["id"] == text["meta"]["file_id"]


def test_the_upload_host_is_guarded_even_when_the_service_may_reach_private_networks(
    slack: SlackStandIn,
) -> None:
    before = len(slack.uploads)
    result = call_service.delay("slack_open", "upload_file", {"filename": "a.txt", "content": "a"})
    with pytest.raises(BlockedAddress):
        result.get(timeout=40)
    assert len(slack.uploads) == before  # nothing reached the upload host
    row = job_of(result.id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "127.0.0.1" in row["error"]


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["invalid_auth", "not_authed", "account_inactive", "token_revoked"])
def test_a_token_slack_refuses_is_permanent(slack: SlackStandIn, channel: str, code: str) -> None:
    # Each method page's error example: {"ok": false, "error": "invalid_auth"}.
    slack.script("chat.postMessage", Reply(error(code)), arg="channel", value=channel)
    err, row = fails("slack", "post_message", channel=channel, text="hi")
    assert str(err).startswith(f"slack chat.postMessage: {code} (")
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["meta"] == {"method": "chat.postMessage", "error": code}


def test_a_wrong_token_fails_at_once_and_is_unhealthy(slack: SlackStandIn, channel: str) -> None:
    err, row = fails("slack_wrong_token", "post_message", channel=channel, text="hi")
    assert str(err) == (
        "slack chat.postMessage: invalid_auth (the token is not valid, or may not be used from this address)"
    )
    assert (row["attempts"], row["meta"]["error"]) == (1, "invalid_auth")
    assert only(slack.calls_of("chat.postMessage", channel=channel)).headers["authorization"] == (
        "Bearer xoxb-not-the-bot-token"
    )


def test_missing_scope_is_permanent_and_names_the_scope(slack: SlackStandIn, channel: str) -> None:
    # Slack's missing_scope answer names the scope the method needs and those the token has.
    answer = error("missing_scope", needed="chat:write", provided="channels:read,users:read")
    slack.script("chat.postMessage", Reply(answer), arg="channel", value=channel)
    err, row = fails("slack", "post_message", channel=channel, text="hi")
    assert str(err) == (
        "slack chat.postMessage: missing_scope"
        " (the token needs scope chat:write; it has channels:read,users:read)"
    )
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["meta"] == {
        "method": "chat.postMessage",
        "error": "missing_scope",
        "needed": "chat:write",
        "provided": "channels:read,users:read",
    }


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        *[(Reply(error(code)), code) for code in TRANSIENT],
        # Not Slack's answer at all (a proxy in the way): judged by its status.
        (Reply(b"<html>Bad Gateway</html>", status=502), "HTTP 502 Bad Gateway"),
    ],
    ids=[*TRANSIENT, "502"],
)
def test_slacks_own_trouble_is_retried(slack: SlackStandIn, channel: str, reply: Reply, message: str) -> None:
    slack.script("chat.postMessage", reply, arg="channel", value=channel)
    out = run("slack", "post_message", channel=channel, text="again")
    row = job_of(out["job_id"])
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert [a["outcome"] for a in row["attempts_log"]] == ["retrying", "succeeded"]
    assert row["attempts_log"][0]["error"] == f"slack chat.postMessage: {message}"
    assert len(slack.calls_of("chat.postMessage", channel=channel)) == 2


def test_ratelimited_in_a_200_answer_waits_its_retry_after(slack: SlackStandIn, channel: str) -> None:
    ts = run("slack", "post_message", channel=channel, text="react to me")["data"]["ts"]
    limited = Reply(error("ratelimited"), headers={"Retry-After": "2"})
    slack.script("reactions.add", limited, arg="channel", value=channel)
    out = run("slack", "add_reaction", channel=channel, timestamp=ts, name="tada")
    first, second = slack.calls_of("reactions.add", channel=channel)
    assert second.at - first.at >= 2
    row = job_of(out["job_id"])
    assert (row["attempts"], row["attempts_log"][0]["error"]) == (2, "slack reactions.add: ratelimited")


def test_warnings_are_kept_on_the_job(slack: SlackStandIn, channel: str) -> None:
    # The shape of a warning: https://api.slack.com/changelog/2016-09-28-response-metadata-is-on-the-way
    answer = {
        "ok": True,
        "channel": channel,
        "ts": "1503435956.000247",
        "warning": "missing_charset",
        "response_metadata": {"warnings": ["missing_charset"]},
    }
    slack.script("chat.postMessage", Reply(answer), arg="channel", value=channel)
    out = run("slack", "post_message", channel=channel, text="hi")
    assert out["meta"] == {"method": "chat.postMessage", "warnings": ["missing_charset"]}
    assert job_of(out["job_id"])["meta"] == out["meta"]

    # On a failure too, beside Slack's code.
    failed = {**error("invalid_blocks"), "response_metadata": {"warnings": ["missing_charset"]}}
    slack.script("chat.postMessage", Reply(failed), arg="channel", value=channel)
    _, row = fails("slack", "post_message", channel=channel, text="hi")
    assert row["meta"] == {
        "method": "chat.postMessage",
        "error": "invalid_blocks",
        "warnings": ["missing_charset"],
    }


def test_ratelimited_holds_that_method_on_every_worker_while_other_methods_go(
    slack: SlackStandIn, channel: str
) -> None:
    # https://docs.slack.dev/apis/web-api/rate-limits: HTTP 429 with a Retry-After header, and
    # the ratelimited error code of every method page.
    slack.seed(channel, 2)
    limited = Reply(error("ratelimited"), status=429, headers={"Retry-After": "3"})
    slack.script("conversations.history", limited, arg="channel", value=channel)
    first = call_service.delay("slack", "conversation_history", {"channel": channel})
    svc = get_services()["slack"]
    history = Scope("method:conversations.history", None)
    wait_for(
        lambda: coordination.acquire(svc, scopes=[history], include_service=False).paused,
        20,
        "conversations.history to be paused",
    )
    limited_at = slack.calls_of("conversations.history", channel=channel)[0].at

    # Eight workers: four want the paused method, four another one.
    others = [f"{channel}P{i}" for i in range(4)]
    held = [call_service.delay("slack", "conversation_history", {"channel": channel}) for _ in range(4)]
    free = [call_service.delay("slack", "post_message", {"channel": c, "text": "hi"}) for c in others]
    for result in [first, *held, *free]:
        assert result.get(timeout=40)["status"] == "succeeded"

    later = slack.calls_of("conversations.history", channel=channel)[1:]
    assert len(later) == 5
    assert min(c.at for c in later) >= limited_at + 3  # no worker called it within Retry-After
    posts = [only(slack.calls_of("chat.postMessage", channel=c)) for c in others]
    assert max(c.at for c in posts) < limited_at + 3  # the others went meanwhile
    row = job_of(first.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert (row["attempts_log"][0]["status_code"], row["attempts_log"][0]["error"]) == (
        429,
        "slack conversations.history: ratelimited",
    )


# ---- limits across two worker nodes -----------------------------------------------------------

SUBMIT = """
import json
from tasks import call_service
post = {{"channel": None, "text": "m"}}
ids = [call_service.delay("slack_limited", "post_message", {{**post, "channel": c}}).id for c in {channels!r}]
print(json.dumps(ids))
"""


@pytest.mark.timeout(240)
def test_channel_and_method_limits_hold_across_two_worker_nodes(tmp_path: Path, slack: SlackStandIn) -> None:
    # slack_limited: chat.postMessage at 3/s (burst 1), each channel at 1/s (burst 1), both
    # shared by two `celery -A tasks worker` processes of four threads through their Redis.
    # Eight channels first, so the method's slots run ahead of the channel's: then six posts to
    # one channel, each waiting for a method slot, must still keep to the channel's limit.
    tag = uuid.uuid4().hex[:6].upper()
    channels = [f"L{tag}X{i}" for i in range(8)] + [f"L{tag}A"] * 6 + [f"L{tag}Y{i % 3}" for i in range(6)]
    names = ["slack_a", "slack_b"]
    logs = [tmp_path / f"worker-{name}.log" for name in names]
    with redis_server(tmp_path) as server:
        env = stack_env(server.url, SERVICES_FILE=SERVICES_FILE)
        with worker_nodes(names, env, tmp_path, ["-P", "threads", "-c", "4"]):
            out = python(SUBMIT.format(channels=channels), env, timeout=120)
            assert out.returncode == 0, out.stderr[-3000:]
            ids: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
            rows = wait_terminal(ids, 90, logs)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    calls = [
        c for c in slack.calls_of("chat.postMessage") if str(c.args.get("channel")).startswith(f"L{tag}")
    ]
    assert len(calls) == len(channels)
    assert all(count_lines(log, "succeeded in") > 0 for log in logs), "both nodes ran jobs"
    # What Slack counts: never more than burst + rate calls in any one-second window.
    per_channel = {
        ch: most_in_window([c.at for c in calls if c.args["channel"] == ch]) for ch in set(channels)
    }
    assert max(per_channel.values()) <= 1 + 1, per_channel
    busiest = most_in_window([c.at for c in calls])
    assert busiest <= 1 + 3
    print(f"\n[slack limits] per channel busiest second {per_channel}, method busiest second {busiest}")


# ---- health, the command line, the schemas and the config -------------------------------------


def test_health_is_auth_test_and_services_lists_the_methods(slack: SlackStandIn) -> None:
    services = get_services()
    ok = health.check(services["slack"])
    assert (ok.ok, ok.status_code) == (True, 200)
    assert slack.calls_of("auth.test")[-1].headers["authorization"] == f"Bearer {SLACK_BOT_TOKEN}"
    bad = health.check(services["slack_wrong_token"])
    assert not bad.ok and bad.error is not None and bad.error.startswith("slack auth.test: invalid_auth")

    listing = cli("services")
    assert listing.returncode == 0, listing.stderr
    assert f"slack (slack, http://127.0.0.1:{os.environ['SLACK_PORT']}/api, bot token" in listing.stdout
    assert "  upload_file: files.getUploadURLExternal + files.completeUploadExternal" in listing.stdout
    assert SLACK_BOT_TOKEN not in listing.stdout


def test_integrations_call_posts_and_waits(slack: SlackStandIn) -> None:
    started = time.time()
    out = cli("call", "slack", "post_message", "channel=C1", "text=hi", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["status"], result["data"]["channel"], result["data"]["message"]["text"]) == (
        "succeeded",
        "C1",
        "hi",
    )
    assert [
        json.loads(c.body) for c in slack.calls_of("chat.postMessage", channel="C1") if c.at >= started
    ] == [{"channel": "C1", "text": "hi"}]


def test_every_operation_has_a_complete_schema() -> None:
    ops = get_services()["slack"].catalog()
    assert sorted(ops) == [
        "add_reaction",
        "conversation_history",
        "list_conversations",
        "lookup_user_by_email",
        "post_message",
        "update_message",
        "upload_file",
    ]
    for name, op in ops.items():
        schema = op.parameters
        Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False, name
        assert schema["description"], name
        assert set(schema.get("required", [])) <= set(schema["properties"]), name
        for prop, spec in schema["properties"].items():
            assert spec.get("description") and spec.get("type"), f"{name}.{prop}"
    assert ops["conversation_history"].parameters["properties"]["limit"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 999,
        "default": 100,
        "description": "The maximum number of items to return. Fewer than the requested number of "
        "items may be returned, even if the end of the conversation history hasn't been reached.",
    }
    with pytest.raises(InvalidParams, match="text or blocks: give at least one of them"):
        ops["post_message"].validate_params({"channel": "C1"})
    with pytest.raises(InvalidParams, match="thread_ts: a reply goes in a channel"):
        ops["upload_file"].validate_params({"filename": "a", "content": "a", "thread_ts": "1.2"})
    with pytest.raises(InvalidParams, match="content: not valid base64"):
        ops["upload_file"].validate_params({"filename": "a", "content": "%%", "encoding": "base64"})


def test_limits_are_data_the_services_file_can_override() -> None:
    base = {"token": "xoxb-x"}
    svc = validate(SlackService, base, "services.s", name="s")
    ops = svc.catalog()
    assert [(s.key, s.rate) for s in svc.scopes(ops["post_message"], {"channel": "#C9", "text": "t"})] == [
        ("method:chat.postMessage", svc.method_rate("chat.postMessage")),
        ("channel:C9", svc.channel_limit.as_rate() if svc.channel_limit else None),
    ]
    tiers = {
        m: svc.method_rate(m)
        for m in ("conversations.list", "conversations.history", "files.completeUploadExternal")
    }
    assert {m: r.per_second * 60 if r else None for m, r in tiers.items()} == {
        "conversations.list": pytest.approx(20),  # Tier 2
        "conversations.history": pytest.approx(50),  # Tier 3
        "files.completeUploadExternal": pytest.approx(100),  # Tier 4
    }

    custom = validate(
        SlackService,
        {
            **base,
            "method_limits": {"chat.postMessage": "100/m", "conversations.list": None},
            "channel_limit": None,
        },
        "services.s",
        name="s",
    )
    posting = custom.scopes(ops["post_message"], {"channel": "C9", "text": "t"})
    assert [(s.key, s.rate and (round(s.rate.per_second * 60), s.rate.burst)) for s in posting] == [
        ("method:chat.postMessage", (100, 1)),
        ("channel:C9", None),  # no limit of ours: Slack's pauses still hold it
    ]
    assert custom.method_rate("conversations.list") is None

    with pytest.raises(ConfigError, match=r"services\.s\.method_limits: chat\.postMesage: not a method"):
        validate(SlackService, {**base, "method_limits": {"chat.postMesage": "1/s"}}, "services.s", name="s")
    with pytest.raises(ConfigError, match=r"services\.s: token: required"):
        validate(SlackService, {}, "services.s", name="s")
