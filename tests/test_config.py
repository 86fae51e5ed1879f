"""The services file and the settings: valid ones load, broken ones fail naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from integrations.auth import BearerAuth
from integrations.config import Settings, load_mailboxes, load_settings, load_webhooks
from integrations.errors import ConfigError, InvalidParams
from integrations.services import Service, load_services
from integrations.services.http_service import HttpService
from integrations.services.rest import RestOperation

SECRET = "s3cr3t-value-never-printed"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "services.yaml"
    p.write_text(text)
    return p


def load(tmp_path: Path, text: str) -> dict[str, Service]:
    return load_services(write(tmp_path, text), Settings())


GOOD = """
services:
  github:
    base_url: https://api.github.com
    auth: {type: bearer, token: ${T_GH_TOKEN}}
    rate_limit: 5000/h
    retry: {max_retries: 5, backoff: 2, backoff_max: 300, jitter: true}
    operations:
      get_repo: {method: GET, path: "/repos/{owner}/{repo}"}
      create_issue:
        method: POST
        path: "/repos/{owner}/{repo}/issues"
        body: {title: str, body: "str | None"}
"""


def test_the_issue_example_loads_with_typed_operations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T_GH_TOKEN", SECRET)
    services = load(tmp_path, GOOD)
    gh = services["github"]
    assert isinstance(gh, HttpService) and isinstance(gh.auth, BearerAuth) and gh.auth.token.get() == SECRET
    assert SECRET not in repr(gh)
    op = gh.catalog()["create_issue"]
    assert isinstance(op, RestOperation)
    assert op.path_params == ["owner", "repo"]
    assert op.validate_params({"owner": "o", "repo": "r", "title": "t"}) == {
        "owner": "o",
        "repo": "r",
        "title": "t",
    }


def test_params_are_checked_by_type_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_GH_TOKEN", SECRET)
    op = load(tmp_path, GOOD)["github"].catalog()["create_issue"]
    with pytest.raises(InvalidParams, match="title: required"):
        op.validate_params({"owner": "o", "repo": "r"})
    with pytest.raises(InvalidParams, match="title: must be a string"):
        op.validate_params({"owner": "o", "repo": "r", "title": [5]})
    with pytest.raises(InvalidParams, match="labels: not a parameter of this operation"):
        op.validate_params({"owner": "o", "repo": "r", "title": "t", "labels": []})


def test_secret_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tok").write_text(SECRET + "\n")
    monkeypatch.delenv("T_GH_TOKEN", raising=False)
    monkeypatch.setenv("T_GH_TOKEN_FILE", str(tmp_path / "tok"))
    gh = load(tmp_path, GOOD)["github"]
    assert isinstance(gh, HttpService) and isinstance(gh.auth, BearerAuth) and gh.auth.token.get() == SECRET


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("https://api.github.com", "${T_MISSING_VAR}"),
            "services.github.base_url: environment variable T_MISSING_VAR is not set",
        ),
        (("type: bearer", "type: oauth9"), "services.github.auth: unknown type; expected one of"),
        (("5000/h", "5000 per hour"), "services.github.rate_limit: must look like"),
        (("backoff_max: 300", "backoff_max: 99999"), "services.github.retry.backoff_max"),
        (("method: GET", "method: FETCH"), "services.github.operations.get_repo.method"),
        (("https://api.github.com", "ftp://api.github.com"), "services.github.base_url"),
        (
            ("title: str", "title: string"),
            "services.github.operations.create_issue: unknown type; use one of",
        ),
        (("rate_limit", "rate_limits"), "services.github.rate_limits: Extra inputs are not permitted"),
    ],
)
def test_a_broken_file_names_service_and_field_and_hides_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], expected: str
) -> None:
    monkeypatch.setenv("T_GH_TOKEN", SECRET)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, GOOD.replace(*change))
    assert expected in str(e.value)
    assert SECRET not in str(e.value)


def test_unreadable_or_invalid_yaml_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_services(tmp_path / "nope.yaml", Settings())
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(tmp_path, "services:\n  a: [\n")


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AUTOSCALE_MAX", "many")
    with pytest.raises(ConfigError, match=r"^invalid settings: WORKER_AUTOSCALE_MAX: ") as e:
        load_settings()
    assert "many" not in str(e.value)
    monkeypatch.setenv("WORKER_AUTOSCALE_MAX", "8")
    monkeypatch.setenv("MAX_COUNTDOWN", "5000")  # above half the visibility timeout (3600)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == "invalid settings: MAX_COUNTDOWN must be at most half of VISIBILITY_TIMEOUT"


def test_cli_reports_a_broken_services_file_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("5000/h", "lots"))
    env = {**os.environ, "SERVICES_FILE": str(path), "T_GH_TOKEN": SECRET}
    out = subprocess.run(
        [sys.executable, "-m", "integrations.cli", "services"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "services.github.rate_limit" in out.stderr
    assert "Traceback" not in out.stderr and SECRET not in out.stderr


WEBHOOKS = """
webhooks:
  github: {type: github, secret: "${T_GH_WEBHOOK}", previous_secret: "${T_GH_WEBHOOK}-old"}
  billing: {type: standard, secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_QUJDREVGR0g="}
mailboxes:
  support: {host: imap.example.com, username: me, password: "${T_GH_WEBHOOK}"}
  local: {host: 127.0.0.1, port: 1143, tls: false, username: me, password: x, interval: 5}
"""


def test_webhook_sources_and_mailboxes_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_GH_TOKEN", SECRET)
    monkeypatch.setenv("T_GH_WEBHOOK", SECRET)
    path = write(tmp_path, GOOD + WEBHOOKS)
    sources = load_webhooks(path)
    assert sources["github"].secrets == [SECRET.encode(), (SECRET + "-old").encode()]
    assert len(sources["billing"].secrets) == 2 and sources["billing"].secrets[1] == b"ABCDEFGH"
    assert SECRET not in repr(sources)
    boxes = load_mailboxes(path)
    assert (boxes["support"].port, boxes["support"].tls, boxes["support"].folder) == (993, True, "INBOX")
    assert (boxes["local"].tls, boxes["local"].interval) == (False, 5)
    assert SECRET not in repr(boxes)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("type: github", "type: gitlab"),
            "webhooks.github.type: Input should be 'github', 'slack' or 'standard'",
        ),
        (
            ("whsec_QUJDREVGR0g=", "QUJDREVGR0g="),
            "webhooks.billing.secret: Standard Webhooks secrets look like",
        ),
        (("whsec_QUJDREVGR0g=", "whsec_***"), "webhooks.billing.secret: Standard Webhooks secrets look like"),
        (
            ("host: imap.example.com,", "host: imap.example.com, tls: false,"),
            "mailboxes.support: tls: plain IMAP",
        ),
        (("interval: 5", "interval: 0"), "mailboxes.local.interval"),
        # An empty key would let anyone sign: ${OLD:-} left empty after a rotation, say.
        (
            ('secret: "${T_GH_WEBHOOK}", previous', 'secret: " ", previous'),
            "webhooks.github.secret: must not be empty",
        ),
        (('"${T_GH_WEBHOOK}-old"', '""'), "webhooks.github.previous_secret: must not be empty"),
        (("billing:", "b" * 64 + ":"), "names are lower-case letters, digits and '_', at most 63"),
    ],
)
def test_broken_webhook_and_mailbox_sections_name_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], expected: str
) -> None:
    monkeypatch.setenv("T_GH_TOKEN", SECRET)
    monkeypatch.setenv("T_GH_WEBHOOK", SECRET)
    path = write(tmp_path, (GOOD + WEBHOOKS).replace(*change))
    with pytest.raises(ConfigError) as e:
        load_webhooks(path)
        load_mailboxes(path)
    assert expected in str(e.value)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WEBHOOK_RETRY_SCHEDULE", "0,5,soon"),
        ("WEBHOOK_RETRY_SCHEDULE", "0,-5"),
        ("WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/33"),
    ],
)
def test_bad_webhook_settings_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


DEFAULTS = """
services:
  api:
    base_url: ${T_BASE_URL:-https://api.example.com}
    timeout: ${T_TIMEOUT:-7}
    headers: {X-Region: "${T_REGION:-eu}", X-Empty: "${T_EMPTY:-}"}
    auth: {type: bearer, token: "${T_TOKEN:-anonymous}"}
    operations:
      get: {method: GET, path: "/things/{id}"}
"""


def test_a_default_stands_in_for_an_unset_variable_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("T_BASE_URL", "T_TIMEOUT", "T_REGION", "T_EMPTY", "T_TOKEN"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_FILE", raising=False)
    api = load(tmp_path, DEFAULTS)["api"]
    assert isinstance(api, HttpService) and isinstance(api.auth, BearerAuth)
    assert (api.base_url, api.timeout, api.headers) == (
        "https://api.example.com",
        7.0,
        {"X-Region": "eu", "X-Empty": ""},
    )
    assert api.auth.token.get() == "anonymous"

    # Set, the variable wins, even when it is empty; VAR_FILE wins over the default too.
    monkeypatch.setenv("T_BASE_URL", "https://eu.example.com")
    monkeypatch.setenv("T_REGION", "")
    (tmp_path / "tok").write_text(SECRET + "\n")
    monkeypatch.setenv("T_TOKEN_FILE", str(tmp_path / "tok"))
    api = load(tmp_path, DEFAULTS)["api"]
    assert isinstance(api, HttpService) and isinstance(api.auth, BearerAuth)
    assert (api.base_url, api.headers["X-Region"], api.auth.token.get()) == (
        "https://eu.example.com",
        "",
        SECRET,
    )
    # A value from the environment in a header is a credential to mask; a default is not.
    assert SECRET in api.secret_values() and "eu" not in api.secret_values()


def test_a_duration_beyond_a_century_is_refused_in_one_line() -> None:
    from integrations.config.durations import parse_duration

    assert parse_duration("36500d").days == 36500
    for text in ("99999999999d", "1000000d", "1e400s"):
        with pytest.raises(ValueError, match=r"^must be"):
            parse_duration(text)
