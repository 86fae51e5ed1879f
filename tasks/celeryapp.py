"""The Celery app (``celery -A tasks``): broker, results, reliability options and the beat
schedule, all from the settings and the services file.

Nothing is read at import: the configuration is a promise Celery evaluates when it first needs
it (a worker starting, a first ``delay()``), and the per-service tasks are registered when the
app is finalized. Importing ``tasks`` needs neither the environment nor the services file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init
from kombu.entity import Exchange, Queue

import beat_schedule
from integrations import redact
from integrations.auth import keys
from integrations.config import Mailbox, Settings, get_mailboxes, get_settings
from integrations.config.settings import private_dir, private_file
from integrations.errors import ConfigError
from integrations.services import Service, get_services


def broker_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem://"):
        folder = private_dir(settings.var_dir / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            private_dir(folder / sub)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    if settings.is_amqp:
        # Publisher confirms: a publish returns once RabbitMQ has taken the message (a quorum
        # queue: a majority of its replicas); a message it refuses raises in the submitter.
        return {"confirm_publish": True}
    # A message unacknowledged past the visibility timeout is delivered again; every countdown
    # we allow (settings.max_countdown) stays well below it.
    return {"visibility_timeout": settings.visibility_timeout}


#: The queue of the jobs, handlers and deliveries (on RabbitMQ also the topic exchange's name).
QUEUE = "integrations"
#: Beat's dispatchers and sweepers have a queue of their own: behind a backlog of jobs they
#: would wait, expire unrun, and leave lost or parked jobs waiting for the backlog to drain.
#: Every worker consumes both (a worker started with ``-Q`` must name both).
MAINTENANCE_QUEUE = "integrations.maintenance"


def maintenance_tasks() -> list[str]:
    """The tasks of beat's dispatchers and sweepers (:mod:`beat_schedule`)."""
    return [
        *(e["task"] for e in beat_schedule.DISPATCHERS.values()),
        *beat_schedule.SWEEPERS.values(),
        *(e["task"] for e in beat_schedule.retention(0).values()),
    ]


def queue_options(settings: Settings) -> dict[str, Any]:
    """The two queues, and on RabbitMQ how they are declared: quorum queues (replicated,
    durable, with a delivery count) behind a topic exchange. Celery 5.7 then uses RabbitMQ's
    native delayed delivery for countdowns (its ``celery_delayed_*`` queues hold the message,
    not the worker); it refuses direct exchanges for that, hence the topic one."""
    routes = {task: {"queue": MAINTENANCE_QUEUE} for task in maintenance_tasks()}
    names = (QUEUE, MAINTENANCE_QUEUE)
    if not settings.is_amqp:
        return {
            "task_queues": [Queue(n, Exchange(n), routing_key=n) for n in names],  # type: ignore[no-untyped-call]
            "task_default_queue": QUEUE,
            "task_routes": routes,
        }
    exchange = Exchange(QUEUE, type="topic", durable=True)  # type: ignore[no-untyped-call]
    quorum = {"x-queue-type": "quorum"}
    return {
        "task_queues": [Queue(n, exchange, routing_key=n, queue_arguments=quorum) for n in names],  # type: ignore[no-untyped-call]
        "task_default_queue": QUEUE,
        "task_default_exchange": QUEUE,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": QUEUE,
        "task_routes": routes,
    }


def delay_options(wait: float) -> dict[str, Any]:
    """The ``apply_async``/``retry`` options that hold a message back ``wait`` seconds.

    Celery 5.7's native delayed delivery (RabbitMQ with quorum queues) counts whole seconds and
    refuses a countdown below one (kombu's ``calculate_routing_key`` raises ValueError for 0).
    Such a wait goes straight to the queue with its ETA in the message's ``eta`` header (Celery's
    message protocol 2), and the worker holds it for the fraction of a second.
    """
    if 0 < wait < 1 and get_settings().is_amqp:
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)
        return {"countdown": 0, "headers": {"eta": eta.isoformat()}}
    return {"countdown": wait}


def call_task_name(service: str) -> str:
    """The name of the task that runs ``service``'s jobs."""
    return f"integrations.call.{service}"


def rate_limit_annotations(settings: Settings, services: dict[str, Service]) -> dict[str, Any]:
    """Celery's own ``rate_limit`` per service task, on the embedded defaults only.

    Celery's limit holds per worker instance. With a shared Redis the global limiter holds for
    all workers at once and replaces it. The two together starve deferred jobs: a rate-limited
    task with a countdown waits in Celery's bucket (measured: about one call a second for a
    50/s service under a backlog).
    """
    if settings.coordination_url:
        return {}
    return {call_task_name(s.name): {"rate_limit": s.rate_limit} for s in services.values() if s.rate_limit}


def beat_entries(
    settings: Settings, services: dict[str, Service], mailboxes: dict[str, Mailbox]
) -> dict[str, dict[str, Any]]:
    keep = settings.ledger_retention
    return beat_schedule.build(
        {s.name: s.health.interval for s in services.values() if s.health and s.health.enabled},
        {m.name: m.interval for m in mailboxes.values() if m.enabled},
        sweep_every=settings.sweep_interval,
    ) | beat_schedule.retention(keep.total_seconds() if keep else None)


def celery_config(
    settings: Settings, services: dict[str, Service], mailboxes: dict[str, Mailbox]
) -> dict[str, Any]:
    if settings.is_sqlite or settings.broker_url.startswith("filesystem://"):
        private_dir(settings.var_dir, tighten=True)
    if settings.results_url.startswith("db+sqlite:///"):
        private_file(Path(settings.results_url.removeprefix("db+sqlite:///")))
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.results_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        **queue_options(settings),
        # A job is acknowledged only once it has run; a worker lost mid-call gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "broker_transport_options": broker_options(settings),
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "result_expires": 86400,
        # Flower builds its task list from events; they carry only task names and job ids.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "beat_schedule": beat_entries(settings, services, mailboxes),
        "beat_schedule_filename": str(settings.var_dir / "celerybeat-schedule"),
        "task_annotations": rate_limit_annotations(settings, services),
    }


def _lazy_config() -> dict[str, Any]:
    return celery_config(get_settings(), get_services(), get_mailboxes())


app = Celery("agent_integrations")
app.add_defaults(_lazy_config)

# Every log record of every process of the app goes through the redactor, at every level.
redact.install()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_logs(**_: Any) -> None:
    redact.install()


@worker_init.connect
def _check_at_start(**_: Any) -> None:
    """A worker reads its configuration at start, so a broken services file stops it there, and
    so does a missing key when a service keeps OAuth tokens in the ledger."""
    services = get_services()
    try:
        keys.require_for(services.values())
    except ConfigError as e:
        # SystemExit rather than the error: Celery logs what a signal handler raises and goes on.
        raise SystemExit(f"worker not started: {e}") from None
