"""Reference tasks for `make bench`, loaded into the worker with ``-I bench_tasks``.

``noop`` is Celery's own ceiling; ``naive`` is what an agent would write inline: a plain task
that calls ``requests.get`` and inserts one row with a SQLAlchemy session.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tasks import app


class Base(DeclarativeBase):
    pass


class NaiveCall(Base):
    __tablename__ = "bench_naive_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(String(512))


engine = create_engine(os.environ["DATABASE_URL"])


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.naive")
def naive(url: str, verify: str | bool = True) -> dict[str, Any]:
    r = requests.get(url, timeout=10, verify=verify)
    with Session(engine) as session:
        session.add(NaiveCall(status=r.status_code, body=r.text[:512]))
        session.commit()
    return {"status": r.status_code, "data": r.json()}
