"""Flower against the test broker: basic auth required; the job's task shows no params, no secret."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TOKEN, free_port
from procs import ROOT, env_with, running, wait_for

from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


def test_flower_needs_credentials_and_shows_only_job_ids(tmp_path: Path, key: str) -> None:
    port = free_port()
    password = "flower-" + key
    env = env_with(FLOWER_USER="ops", FLOWER_PASSWORD=password, FLOWER_PORT=port)
    cmd = ["make", "--no-print-directory", "flower"]
    log = tmp_path / "flower.log"
    base = f"http://127.0.0.1:{port}"
    auth = ("ops", password)

    def listed(task_id: str) -> dict[str, Any] | None:
        tasks: dict[str, dict[str, Any]] = requests.get(base + "/api/tasks", auth=auth, timeout=10).json()
        task = tasks.get(task_id)
        return task if task and task.get("name") and task.get("state") == "SUCCESS" else None

    with running(cmd, env, log):
        wait_for(lambda: requests.get(base + "/healthcheck", timeout=2).ok, 60, "Flower to listen", log)

        # Flower lists tasks from the events it sees once its event receiver runs, which is a
        # little after it listens: wait until it has seen a whole warm-up job.
        def warm_up() -> dict[str, Any] | None:
            job = call_service.delay("stub", "echo", {"key": key})
            job.get(timeout=20)
            time.sleep(1.0)
            return listed(job.id)

        wait_for(warm_up, 40, "Flower to see task events", log)
        r = call_service.delay("stub", "create", {"key": key, "title": "private-title-" + key})
        r.get(timeout=20)

        assert requests.get(base + "/api/workers", timeout=10).status_code == 401
        assert requests.get(base + "/api/tasks", timeout=10).status_code == 401
        assert requests.get(base + "/api/tasks", auth=("ops", "wrong"), timeout=10).status_code == 401

        workers = requests.get(base + "/api/workers?refresh=1", auth=auth, timeout=20)
        assert workers.status_code == 200 and workers.json(), workers.text

        task = wait_for(lambda: listed(r.id), 20, "Flower to list the job's task", log)
        assert task["name"] == "integrations.call.stub"
        assert r.id in str(task["args"])
        dump = json.dumps(task) + json.dumps(workers.json())
        assert "private-title" not in dump and TOKEN not in dump
    assert password not in log.read_text() and TOKEN not in log.read_text()


def test_make_flower_refuses_to_start_without_a_password() -> None:
    env = env_with(FLOWER_PASSWORD=None)
    out = subprocess.run(["make", "--no-print-directory", "flower"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0
    assert "set FLOWER_PASSWORD" in out.stderr


def argv_of_group(pgid: int) -> list[str]:
    """The command lines of every live process in process group ``pgid`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) == pgid:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue
    return found


def test_make_flower_reads_the_password_from_flower_password_file(tmp_path: Path, key: str) -> None:
    port = free_port()
    password = "flower-file-" + key
    secret = tmp_path / "flower_password"
    secret.write_text(password + "\n")  # as written by `echo`: the newline is not part of it
    env = env_with(FLOWER_USER="ops", FLOWER_PASSWORD=None, FLOWER_PASSWORD_FILE=secret, FLOWER_PORT=port)
    log = tmp_path / "flower.log"
    base = f"http://127.0.0.1:{port}"
    with running(["make", "--no-print-directory", "flower"], env, log) as proc:
        wait_for(lambda: requests.get(base + "/healthcheck", timeout=2).ok, 60, "Flower to listen", log)
        assert requests.get(base + "/api/workers", timeout=10).status_code == 401
        assert (
            requests.get(base + "/api/workers", auth=("ops", password + "\n"), timeout=10).status_code == 401
        )
        assert requests.get(base + "/api/workers", auth=("ops", password), timeout=20).status_code == 200
        commands = argv_of_group(proc.pid)
        assert any("flower" in c for c in commands), commands
        assert not any(password in c for c in commands)  # the password is in no process's argv
    assert password not in log.read_text()
