"""A worker node's heartbeat, and the job messages it holds (:mod:`integrations.liveness`).

The node's run gets its name at ``worker_init``, before the pool forks, so every pool process
claims jobs under it. The consumer notes each job message as it arrives (one Redis call, on
the consumer's thread); a thread of the main process beats every ``NODE_HEARTBEAT`` seconds and
drops the jobs the node no longer holds. A clean stop removes the node once its pool is done.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from celery.signals import task_received, worker_init, worker_ready, worker_shutdown
from celery.utils.log import get_logger
from celery.worker import state

from integrations import liveness
from integrations.config import get_settings

log = get_logger(__name__)

#: The name of this worker node's run, in the main process and its pool; ``None`` outside a
#: worker, or without a coordination Redis.
NODE: str | None = None
_CALL_PREFIX = "integrations.call."
_stop = threading.Event()
_thread: threading.Thread | None = None
_failing = False


def node() -> str | None:
    """The node to record on a job this process claims."""
    return NODE


@worker_init.connect
def _name_the_node(sender: Any = None, **_: Any) -> None:
    global NODE
    if get_settings().coordination_url:
        NODE = liveness.new_node_id(str(getattr(sender, "hostname", None) or "celery"))
        _safely(liveness.beat, NODE)


@task_received.connect
def _note_held(request: Any = None, **_: Any) -> None:
    """A job message reached this node: note it before the node can do anything with it."""
    if NODE is None or request is None or not str(request.name).startswith(_CALL_PREFIX):
        return
    _safely(liveness.beat, NODE, request.id)
    _start()  # a worker that never reports ready (an embedded one) beats all the same


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    if NODE is not None:
        _start()


@worker_shutdown.connect
def _leave(**_: Any) -> None:
    """The pool is done and the broker has its unacknowledged messages back: nothing is lost."""
    global _thread
    if NODE is None:
        return
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
        _thread = None
    _safely(liveness.leave, NODE)


def _start() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _stop.clear()
        _thread = threading.Thread(target=_beat_forever, name="integrations-heartbeat", daemon=True)
        _thread.start()


def _beat_forever() -> None:
    every = get_settings().node_heartbeat
    while NODE is not None and not _stop.is_set():
        _safely(liveness.beat, NODE)
        # The jobs this node still has: reserved, waiting for their ETA, or running.
        _safely(liveness.prune, NODE, set(state.requests.copy()))
        _stop.wait(every)


def _safely(fn: Any, *args: Any) -> None:
    """Run ``fn``; a Redis that is away costs a beat, never the worker (one warning per outage)."""
    global _failing
    try:
        fn(*args)
    except redis.RedisError as e:
        if not _failing:
            log.warning(
                "worker liveness not recorded (%s): the coordination Redis is unreachable", type(e).__name__
            )
        _failing = True
    else:
        if _failing:
            log.info("worker liveness recorded again")
        _failing = False
