"""Kinds come from entry points: a package outside ``integrations/`` adds one without touching
ours, and every installed kind is listed and runs jobs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import redis
from conftest import SPARE_REDIS_URL
from procs import BIN, cli, env_with, running, wait_for
from stub import Stub

from integrations.services import kinds

#: A third party's package: one module, and the metadata pip would have written for it.
KIND_MODULE = '''
"""Acme's weather API as a kind of service: one built-in operation."""
from typing import Any, Literal
from collections.abc import Mapping

from integrations import http
from integrations.services import Attempt, Operation
from integrations.services.http_service import HttpService
from integrations.services.params import object_schema


class Forecast(Operation):
    def build_parameters(self) -> dict[str, Any]:
        city = {"type": "string", "minLength": 1, "description": "A city's name."}
        return object_schema({"city": city}, ["city"], "Tomorrow's weather in a city.")


FORECAST = Forecast(description="Tomorrow's weather in a city.")


class WeatherService(HttpService):
    kind: Literal["weather"] = "weather"

    def catalog(self) -> Mapping[str, Operation]:
        return {"forecast": FORECAST}

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        return http.Request("GET", f"{self.base_url}/echo/{params['city']}", params={"days": 1})
'''
METADATA = "Metadata-Version: 2.1\nName: acme-kinds\nVersion: 1.0\n"
ENTRY_POINTS = "[integrations.kinds]\nweather = acme_kinds:WeatherService\n"


def install_elsewhere(root: Path) -> Path:
    """The package as pip leaves it in a site directory: the module and its dist-info."""
    site = root / "site"
    (site / "acme_kinds").mkdir(parents=True)
    (site / "acme_kinds" / "__init__.py").write_text(textwrap.dedent(KIND_MODULE))
    info = site / "acme_kinds-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA)
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def test_our_kinds_register_through_the_entry_point_group_too() -> None:
    assert {"rest", "github", "slack", "graphql", "llm", "smtp", "sql", "s3", "files"} <= set(kinds())


def test_a_kind_from_another_package_is_listed_and_runs_a_job(tmp_path: Path, stub: Stub, key: str) -> None:
    site = install_elsewhere(tmp_path)
    services = tmp_path / "services.yaml"
    services.write_text(f"services:\n  acme_weather:\n    kind: weather\n    base_url: {stub.url}\n"
                        "    allow_private_network: true\n")  # fmt: skip
    broker = redis.Redis.from_url(SPARE_REDIS_URL)
    broker.flushdb()
    env = env_with(
        SERVICES_FILE=services,
        PYTHONPATH=f"{site}:{env_with()['PYTHONPATH']}",
        BROKER_URL=SPARE_REDIS_URL,
        RESULT_BACKEND=SPARE_REDIS_URL,
        EVENT_HANDLERS=None,
    )
    listed = cli("services", env=env)
    assert listed.returncode == 0, listed.stderr
    assert f"acme_weather (weather, {stub.url}, auth none)" in listed.stdout
    assert "  forecast" in listed.stdout

    log = tmp_path / "worker.log"
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "threads", "-c", "2", "--hostname=acme@%h"]
    cmd.append("--loglevel=INFO")
    with running(cmd, env, log):
        wait_for(lambda: "ready." in log.read_text(), 60, "the worker to start", log)
        out = cli("call", "acme_weather", "forecast", f"city={key}", "--wait", "--timeout", "30", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and result["service"] == "acme_weather"
    (hit,) = stub.hits_for(key)
    assert hit.path == f"/echo/{key}" and hit.query == {"days": ["1"]}
    refused = cli("call", "acme_weather", "forecast", env=env)
    assert refused.returncode == 2 and "city: required" in refused.stderr
    broker.flushdb()
