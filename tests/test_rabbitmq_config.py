"""RabbitMQ's settings, its compose profile and the KEDA examples, checked by reading (issue 15):
there is no Docker engine nor Kubernetes here. What runs on RabbitMQ is in test_rabbitmq.py."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from procs import ROOT
from test_docker import environment, secrets_of, services

from integrations.config import Settings
from tasks.celeryapp import MAINTENANCE_QUEUE, QUEUE, broker_options, celery_config

# A password of its own: the settings register it with the log redactor of this process.
AMQP = "amqp://integrations:settings-test-4b1f0c@rabbitmq:5672/"
REDIS = "redis://redis:6379/0"


# --- settings ------------------------------------------------------------------------------------


def test_beside_rabbitmq_results_go_to_the_coordination_redis_and_countdowns_to_rabbitmq() -> None:
    s = Settings(broker_url=AMQP, coordination_url=REDIS, result_backend=None)  # the tests set one
    assert s.is_amqp and s.results_url == REDIS
    assert broker_options(s) == {"confirm_publish": True}  # no visibility timeout: Redis only
    conf = celery_config(s, {}, {})
    queues = {q.name: q for q in conf["task_queues"]}
    assert set(queues) == {QUEUE, MAINTENANCE_QUEUE}
    for q in queues.values():
        assert q.queue_arguments == {"x-queue-type": "quorum"}
        assert q.exchange.type == "topic"  # native delayed delivery refuses direct exchanges
    assert conf["task_routes"]["integrations.requeue_stuck_jobs"] == {"queue": MAINTENANCE_QUEUE}
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    # An explicit RESULT_BACKEND still wins; without a coordination Redis, the ledger's database.
    assert Settings(broker_url=AMQP, coordination_url=REDIS, result_backend="rpc://").results_url == "rpc://"
    alone = Settings(
        broker_url=AMQP, coordination_url="", result_backend=None, database_url="postgresql+psycopg://db/x"
    )
    assert alone.results_url == "db+postgresql+psycopg://db/x"


def test_rabbitmq_without_a_coordination_url_or_with_too_short_a_consumer_timeout_is_refused() -> None:
    # A Redis broker used to give the coordination Redis for free; RabbitMQ does not.
    with pytest.raises(ValueError, match="set COORDINATION_URL to a Redis"):
        Settings(broker_url=AMQP)
    with pytest.raises(ValueError, match="must stay below CONSUMER_TIMEOUT"):
        Settings(broker_url=AMQP, coordination_url=REDIS, task_time_limit=400)  # 5 x 400 > 1800
    Settings(broker_url=AMQP, coordination_url=REDIS, task_time_limit=400, consumer_timeout=3600)
    # Redis as the broker: neither applies.
    assert Settings(broker_url=REDIS, task_time_limit=400).coordination_url == REDIS


def test_a_node_is_not_declared_lost_before_it_could_miss_three_beats() -> None:
    with pytest.raises(ValueError, match="NODE_LOST_AFTER must be at least three NODE_HEARTBEAT"):
        Settings(node_heartbeat=10, node_lost_after=20)


# --- compose: the rabbitmq profile -------------------------------------------------------------


def test_compose_offers_rabbitmq_as_a_profile_with_its_credentials_in_a_secret_file() -> None:
    rabbit = services()["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert rabbit["restart"] == "unless-stopped"
    assert rabbit["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert "environment" not in rabbit  # the password is in a config file mounted as a secret
    [secret] = rabbit["secrets"]
    assert secret["source"] == "rabbitmq_credentials"
    assert secret["target"].startswith("/etc/rabbitmq/conf.d/")
    # Its configuration: the consumer timeout above what a worker may hold a message for with
    # the default settings, and what CONSUMER_TIMEOUT says by default.
    mounted = next(v for v in rabbit["volumes"] if v.startswith("./rabbitmq.conf:"))
    assert mounted.split(":")[1].startswith("/etc/rabbitmq/conf.d/")
    conf = dict(
        line.split(" = ", 1)
        for line in (ROOT / "docker" / "rabbitmq.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    defaults = Settings()
    held = (defaults.worker_prefetch_multiplier + 1) * defaults.task_time_limit
    assert int(conf["consumer_timeout"]) == defaults.consumer_timeout * 1000 > held * 1000


def test_every_process_reads_the_broker_from_a_file_and_coordinates_through_redis() -> None:
    app = [name for name, svc in services().items() if "build" in svc]
    for name in app:
        env = environment(name)
        assert "BROKER_URL" not in env, name
        if name == "migrate":
            continue  # the database only
        assert env["BROKER_URL_FILE"] == "/run/secrets/broker_url", name
        assert "broker_url" in secrets_of(name), name
        assert env["COORDINATION_URL"] == REDIS, name
        depends: dict[str, Any] = services()[name]["depends_on"]
        assert depends["rabbitmq"] == {"condition": "service_healthy", "required": False}, name
        assert depends["redis"]["condition"] == "service_healthy", name
    # Both brokers' URLs pass the settings the processes load.
    for url in (REDIS, AMQP):
        assert Settings(broker_url=url, coordination_url=REDIS).coordination_url == REDIS


# --- KEDA -------------------------------------------------------------------------------------


def keda(name: str) -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "docker" / "keda" / name).read_text()))
    assert all(d["apiVersion"] == "keda.sh/v1alpha1" for d in docs)
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ScaledObject", "TriggerAuthentication"} and len(docs) == 2
    return by_kind


@pytest.mark.parametrize(
    ("name", "trigger", "queue_key", "target_key", "secret_parameter"),
    [
        ("worker-redis.yaml", "redis", "listName", "listLength", "password"),
        ("worker-rabbitmq.yaml", "rabbitmq", "queueName", "value", "host"),
    ],
)
def test_the_keda_examples_scale_the_workers_on_the_job_queue(
    name: str, trigger: str, queue_key: str, target_key: str, secret_parameter: str
) -> None:
    found = keda(name)
    scaled, auth = found["ScaledObject"]["spec"], found["TriggerAuthentication"]
    assert scaled["scaleTargetRef"]["name"] == "integrations-worker"
    # Never to zero: beat's housekeeping and a lost node's jobs need a worker.
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    assert scaled["cooldownPeriod"] >= Settings().task_time_limit
    [t] = scaled["triggers"]
    assert t["type"] == trigger
    meta = t["metadata"]
    assert meta[queue_key] == QUEUE  # the jobs' queue, not the maintenance queue
    assert all(isinstance(v, str) for v in meta.values())  # KEDA takes strings only
    assert int(meta[target_key]) > 0
    # Credentials come from a Secret through the TriggerAuthentication, never inline.
    assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == secret_parameter
    assert not {"host", "password", "hostFromEnv", "passwordFromEnv"} & set(meta)
    assert "@" not in " ".join(meta.values())
    if trigger == "redis":
        host, port = meta["address"].rsplit(":", 1)
        assert host and port.isdigit()
    else:
        assert (meta["protocol"], meta["mode"]) == ("amqp", "QueueLength")
