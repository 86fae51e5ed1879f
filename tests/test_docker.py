"""docker/compose.yaml and docker/Dockerfile, checked without a Docker engine (there is none here).

The compose file is validated against the Compose Specification's JSON schema (as vendored by
check-jsonschema) and held to the rules that make it come up on a first start and keep its
secrets: Postgres checked over TCP, ``migrate`` before whatever needs the database, restart
policies, healthchecks, no fixed host port on a service meant to scale, secrets as files only.
The worker's and beat's healthcheck commands are run against a real worker and a real beat.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from conftest import SPARE_REDIS_URL
from procs import BIN, ROOT, env_with, running, wait_for

from integrations.config.settings import FILE_SETTINGS

DOCKER = ROOT / "docker"
#: Long-running services; ``migrate`` runs once.
SERVERS = ("redis", "postgres", "worker", "beat", "receiver", "flower")
#: Names that say a value is a credential.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_?KEY|BASIC_AUTH|CREDENTIAL|PRIVATE", re.IGNORECASE)
URL_NAME = re.compile(r"_URL$|^RESULT_BACKEND$")
INTERPOLATED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
#: Settings named *_FILE that name a file, not a secret.
NOT_SECRETS = {"SERVICES_FILE"}


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):  # the list form: NAME=value
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def secrets_of(service: str) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in services()[service].get("secrets") or []}


def healthcheck(service: str) -> list[str]:
    test = services()[service]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return [str(part) for part in test]


def test_compose_yaml_is_valid_against_the_compose_specification() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())
    ]
    assert errors == []
    # What the schema cannot see: every reference names something declared.
    for name, svc in services().items():
        for dependency in svc.get("depends_on") or {}:
            assert dependency in services(), f"{name} depends on an unknown service {dependency}"
        assert secrets_of(name) <= set(compose().get("secrets") or {}), name
        for volume in svc.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            assert source.startswith((".", "/")) or source in (compose().get("volumes") or {}), volume


def test_postgres_is_checked_over_tcp_with_a_start_period() -> None:
    # On a first start, initdb's temporary server answers pg_isready on the socket only.
    test = healthcheck("postgres")
    command = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
    assert command[0] == "pg_isready"
    assert command[command.index("-h") + 1] == "127.0.0.1"
    assert services()["postgres"]["healthcheck"].get("start_period")


def test_the_database_is_migrated_once_it_answers_and_before_anything_uses_it() -> None:
    migrate = services()["migrate"]
    assert migrate["command"] == ["integrations", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"
    users = [name for name in services() if "DATABASE_URL_FILE" in environment(name) and name != "migrate"]
    assert {"worker", "beat", "receiver"} <= set(users)
    for name in users:
        assert services()[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", (
            name
        )


def test_every_long_running_service_restarts_and_has_a_healthcheck() -> None:
    for name in SERVERS:
        assert services()[name].get("restart") in ("always", "unless-stopped"), name
        assert healthcheck(name), name
    assert "healthz" in " ".join(healthcheck("receiver"))
    assert "/healthcheck" in " ".join(healthcheck("flower"))


def test_the_worker_checks_its_own_node_and_beat_its_schedule_file() -> None:
    worker = healthcheck("worker")
    assert worker[0] == "CMD-SHELL"
    # $$ is Compose's escape: the shell in the container expands $HOSTNAME, the node's name.
    assert re.fullmatch(r"celery -A tasks inspect ping .*(-d|--destination) celery@\$\$HOSTNAME", worker[1])
    assert "/var/lib/integrations/celerybeat-schedule" in " ".join(healthcheck("beat"))
    assert "beat-data:/var/lib/integrations" in services()["beat"]["volumes"]


def host_port(mapping: Any) -> str:
    """The host side of a port mapping: "" when Compose picks one."""
    if isinstance(mapping, dict):
        return str(mapping.get("published") or "")
    parts = str(mapping).split("/")[0].rsplit(":", 2)
    return parts[-2] if len(parts) >= 2 else ""


def test_no_service_meant_to_scale_publishes_a_fixed_host_port() -> None:
    scaled = [name for name, svc in services().items() if "replicas" in (svc.get("deploy") or {})]
    assert {"worker", "receiver"} <= set(scaled)
    for name in scaled:
        for mapping in services()[name].get("ports") or []:
            published = host_port(mapping)
            assert published == "" or "-" in published, f"{name} publishes the fixed host port {published}"
    assert "ports" not in services()["worker"]


def test_no_secret_is_in_an_environment_block_only_files_are() -> None:
    declared = compose()["secrets"]
    for name in services():
        for key, value in environment(name).items():
            if key.endswith("_FILE") and key not in NOT_SECRETS:
                assert value.startswith("/run/secrets/"), (name, key)
                assert value.removeprefix("/run/secrets/") in secrets_of(name), (name, key)
                continue
            assert not SECRET_NAME.search(key), f"{name}: {key} in environment"
            for variable in INTERPOLATED.findall(value):
                assert not SECRET_NAME.search(variable), f"{name}: {key} takes ${{{variable}}}"
            if URL_NAME.search(key):
                assert urlsplit(value).password is None, f"{name}: {key} holds a password"
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/")
    # The secret files are neither committed nor sent to a build.
    assert "docker/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "docker/secrets/" in (ROOT / ".dockerignore").read_text().split()


def test_each_process_gets_its_own_secrets_only() -> None:
    # The app reads NAME_FILE for its settings, and VAR_FILE for a ${VAR} of the services file.
    app = [name for name, svc in services().items() if "build" in svc]
    for name in app:
        for key in environment(name):
            if key.endswith("_FILE") and key not in NOT_SECRETS:
                variable = key.removesuffix("_FILE")
                assert variable in FILE_SETTINGS or SECRET_NAME.search(variable), (name, key)
    tokens = {name for name in app if any(k.endswith("_TOKEN_FILE") for k in environment(name))}
    webhook = {name for name in app if any("WEBHOOK_SECRET" in k for k in environment(name))}
    assert tokens == {"worker"} and webhook == {"receiver"}
    assert {name for name in app if "FLOWER_PASSWORD_FILE" in environment(name)} == {"flower"}
    # No ledger, no token: the broker's URL (RabbitMQ's holds a password) and its own password.
    assert secrets_of("flower") == {"flower_password", "broker_url"}
    assert environment("postgres")["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_ignore_files_keep_local_state_out_of_the_image_and_the_repository() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var/", ".env", "**/__pycache__", ".mypy_cache/", ".pytest_cache/"} <= set(
        ignored
    )
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_the_image_is_python_3_11_slim_runs_as_a_user_and_installs_the_integrations_command() -> None:
    lines = [
        ln.strip()
        for ln in (DOCKER / "Dockerfile").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert max(i for i, ln in enumerate(lines) if ln.startswith("USER ")) > max(
        i for i, ln in enumerate(lines) if ln.startswith("RUN ")
    )
    assert any(ln.startswith("COPY tasks") for ln in lines) and any(
        ln.startswith("COPY integrations") for ln in lines
    )
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["integrations"] == "tasks.cli:main"


# ------------------------------------------------------------------------------------------------
# The healthcheck commands, run against real processes
# ------------------------------------------------------------------------------------------------


def test_the_workers_healthcheck_passes_for_its_own_node_only(tmp_path: Path) -> None:
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    env = env_with(BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, COORDINATION_URL=None)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    node = "compose-check"
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "threads", "-c", "1", "--loglevel=INFO"]
    cmd += [f"--hostname=celery@{node}", "--without-mingle", "--without-gossip"]
    log = tmp_path / "worker.log"
    # In the container the shell expands $HOSTNAME; Compose has turned $$ into $ by then.
    check = healthcheck("worker")[1].replace("$$", "$")

    def run_check(hostname: str, timeout: str = "10") -> int:
        command = check.replace("--timeout 10", f"--timeout {timeout}")
        return subprocess.run(
            ["sh", "-c", command],
            env={**env, "HOSTNAME": hostname},
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        ).returncode

    with running(cmd, env, log):
        wait_for(lambda: "ready." in log.read_text(), 60, "the worker to start", log)
        assert run_check(node) == 0
        assert run_check("another-node", timeout="2") != 0  # no answer for a node that is not there


def test_beats_healthcheck_passes_while_beat_saves_its_schedule(tmp_path: Path) -> None:
    folder = tmp_path / "beat"
    folder.mkdir()
    command = [part.replace("/var/lib/integrations", str(folder)) for part in healthcheck("beat")[1:]]
    command[0] = str(BIN / "python")

    def run_check() -> int:
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    assert run_check() != 0  # no schedule file yet
    env = env_with(BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, COORDINATION_URL=None)
    cmd = [str(BIN / "celery"), "-A", "tasks", "beat", f"--schedule={folder / 'celerybeat-schedule'}"]
    log = tmp_path / "beat.log"
    with running(cmd, env, log):
        wait_for(lambda: list(folder.glob("celerybeat-schedule*")), 60, "beat's schedule file", log)
        assert run_check() == 0
    stale = time.time() - 600
    for f in folder.glob("celerybeat-schedule*"):
        os.utime(f, (stale, stale))
    assert run_check() != 0  # a beat that stopped saving for ten minutes is unhealthy
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()


@pytest.mark.parametrize("service", ["receiver", "flower"])
def test_the_http_healthchecks_ask_the_port_the_service_listens_on(service: str) -> None:
    env = environment(service)
    command = services()[service]["command"]
    port = env.get("RECEIVER_PORT") or next(a.split("=", 1)[1] for a in command if a.startswith("--port="))
    assert f"127.0.0.1:{port}/" in " ".join(healthcheck(service))
