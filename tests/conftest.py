"""Test set-up: real Redis, real Postgres, a real Celery worker and a real HTTP stub on loopback.

The environment is set before anything imports ``tasks``, because the Celery app and the
services are built from it at import. A service that is down fails the run loudly: nothing
here skips.
"""

from __future__ import annotations

import atexit
import base64
import os
import secrets
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from private_ca import make_ca  # noqa: E402
from smtp_server import make_certs  # noqa: E402
from stub import Stub, TlsStub  # noqa: E402

#: Under pytest-xdist (`make test` runs two processes, a test file each at a time) each process
#: has a database and two Redis databases of its own: gw0 the ones named, gw1 the next ones.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_N = int(XDIST_WORKER[2:]) if XDIST_WORKER[2:].isdigit() else 0

_redis = make_url(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13"))
_redis = _redis.set(database=str((int(_redis.database or 0) - 4 * _N) % 16))
REDIS_URL = _redis.render_as_string(hide_password=False)
#: A second database of the same Redis, for workers that must not share the session worker's queue.
SPARE_REDIS_URL = os.environ.get("TEST_SPARE_REDIS_URL") or _redis.set(
    database=str((int(_redis.database or 0) + 1) % 16)
).render_as_string(hide_password=False)
_database = make_url(os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
if _N:
    _database = _database.set(database=f"{_database.database}_{XDIST_WORKER}")
DATABASE_URL = _database.render_as_string(hide_password=False)
TOKEN = "tok-" + uuid.uuid4().hex  # the secret the stub services use; must never leak
HEADER_TOKEN = "hdr-" + uuid.uuid4().hex  # a fixed header's value from the environment
BOT_TOKEN = "4242:" + uuid.uuid4().hex  # a token inside a base URL's path
# Webhook secrets of the test sources (tests/services.yaml); they must never leak either.
GH_SECRET = "gh-" + uuid.uuid4().hex
STD_SECRET_OLD = "whsec_" + base64.b64encode(os.urandom(24)).decode()
STD_SECRET_NEW = "whsec_" + base64.b64encode(os.urandom(24)).decode()
IMAP_PASSWORD = "imap-" + uuid.uuid4().hex
# The sql kind's test Postgres is the test database (trust auth ignores the password, which is
# in the URL all the same so the tests can prove it never leaks).
SQL_PG = make_url(DATABASE_URL)
SQL_PG_PASSWORD = "pgpw-" + uuid.uuid4().hex
MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
S3_SECRET_ACCESS_KEY = "s3secret-" + secrets.token_urlsafe(24)
SMTP_PASSWORD = "smtp-" + uuid.uuid4().hex
SLACK_BOT_TOKEN = "xoxb-" + secrets.token_hex(12)
# The test CA of the SMTP servers (tests/smtp_server.py), made before the services file loads
# (it names the CA's file), and the folder the files services' roots are made in.
_SCRATCH = Path(tempfile.mkdtemp(prefix="integrations-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, True)
SMTP_CERTS = make_certs(_SCRATCH)
FILES_BASE = _SCRATCH / "files"

STUB = Stub().start()
# An HTTPS stub whose certificate only the tests' own CA vouches for (the ca_bundle: services).
_TLS_DIR = Path(tempfile.mkdtemp(prefix="integrations-test-ca-"))
atexit.register(shutil.rmtree, _TLS_DIR, ignore_errors=True)
CA = make_ca(_TLS_DIR)
TLS_STUB = TlsStub(CA.server_cert, CA.server_key)
TLS_STUB.start()


def rsa_pem() -> tuple[str, str]:
    """``(private, public)`` PEM of a new RSA key (a test app's signing key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


# Connections (issue 13): the clients of the test OAuth server (tests/oauth_server.py) and the
# keys their JWTs are signed with; they must never leak.
OAUTH_MACHINE_SECRET = "cs-" + secrets.token_urlsafe(24)
OAUTH_WEBAPP_SECRET = "ws-" + secrets.token_urlsafe(24)
OAUTH_JWT_KEY, OAUTH_JWT_PUBLIC = rsa_pem()
OAUTH_GITHUB_KEY, OAUTH_GITHUB_PUBLIC = rsa_pem()
INTEGRATIONS_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()


def most_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` inside any half-open window ``[t, t + window)``: what a provider
    counting calls per window would see at its worst."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < window) for i, t in enumerate(times)), default=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


os.environ.update(
    BROKER_URL=REDIS_URL,
    RESULT_BACKEND=REDIS_URL,
    DATABASE_URL=DATABASE_URL,
    SERVICES_FILE=str(ROOT / "tests" / "services.yaml"),
    STUB_URL=STUB.url,
    STUB_TOKEN=TOKEN,
    HEADER_TOKEN=HEADER_TOKEN,
    BOT_TOKEN=BOT_TOKEN,
    LEDGER_BODY_MAX_BYTES="512",
    RESPONSE_MAX_BYTES="65536",
    GH_WEBHOOK_SECRET=GH_SECRET,
    STD_WEBHOOK_SECRETS=f"{STD_SECRET_OLD} {STD_SECRET_NEW}",
    WEBHOOK_MAX_BODY_BYTES="65536",
    EVENT_HANDLERS="handlers_for_tests,handlers_email_agent",
    HANDLERS_REDIS_URL=REDIS_URL,
    # Workers started as processes import the test handlers from here.
    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    HANDLER_MAX_RETRIES="2",
    HANDLER_RETRY_BACKOFF="1",
    # Outgoing webhooks: a short schedule, and loopback allowed through the SSRF guard.
    WEBHOOK_RETRY_SCHEDULE="0,1,1",
    WEBHOOK_TIMEOUT="2",
    WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
    # The test Dovecot (tests/imap_server.py) listens here once a test starts it.
    IMAP_PORT=str(free_port()),
    IMAP_PROXY_PORT=str(free_port()),  # a TcpProxy in front of it, for the mail_cut mailbox
    IMAP_PASSWORD=IMAP_PASSWORD,
    # sql kind (tests/test_sql.py): Postgres directly and through a TcpProxy, MariaDB, SQLite.
    SQL_PG_HOST=SQL_PG.host or "127.0.0.1",
    SQL_PG_PORT=str(SQL_PG.port or 5432),
    SQL_PG_DB=SQL_PG.database or "test",
    SQL_PG_USER=SQL_PG.username or "postgres",
    SQL_PG_PASSWORD=SQL_PG_PASSWORD,
    SQL_PG_PROXY_PORT=str(free_port()),
    SQL_MARIADB_URL=MARIADB_URL,
    SQL_SQLITE_PATH=os.path.join(tempfile.gettempdir(), f"sqlkind-{uuid.uuid4().hex}.db"),
    # s3 kind (tests/test_s3.py): moto's server, a throttling proxy and a TcpProxy in front of it.
    S3_PORT=str(free_port()),
    S3_THROTTLE_PORT=str(free_port()),
    S3_CUT_PORT=str(free_port()),
    S3_ACCESS_KEY_ID="AKIA" + secrets.token_hex(8).upper(),
    S3_SECRET_ACCESS_KEY=S3_SECRET_ACCESS_KEY,
    # aiosmtpd (tests/smtp_server.py) on these ports once tests/test_smtp.py starts it.
    SMTP_PORT=str(free_port()),
    SMTP_TLS_PORT=str(free_port()),
    SMTP_PASSWORD=SMTP_PASSWORD,
    SMTP_CA_BUNDLE=str(SMTP_CERTS.ca),
    FILES_BASE=str(FILES_BASE),
    # README claims (issue 10): the HTTPS stub and its CA; the port of the redirect-hop servers.
    TLS_STUB_URL=TLS_STUB.url,
    TLS_CA_FILE=str(CA.ca_cert),
    HOP_PORT=str(free_port()),
    # The Slack stand-in (tests/slack_server.py): the Web API, and its upload host on another port.
    SLACK_PORT=str(free_port()),
    SLACK_FILES_PORT=str(free_port()),
    SLACK_BOT_TOKEN=SLACK_BOT_TOKEN,
    # graphql kind: the GraphQL server of tests/graphql_server.py, once tests/test_graphql.py starts it.
    GRAPHQL_PORT=str(free_port()),
    # llm kind (tests/test_llm.py): the OpenAI- and Anthropic-compatible server (tests/llm_server.py).
    LLM_PORT=str(free_port()),
    # Connections (issue 13): the test OAuth server (the `oauth` fixture starts it), the key of
    # tokens at rest, and the receiver's callback (served on that port by the tests that need it).
    OAUTH_URL=f"http://127.0.0.1:{free_port()}",
    OAUTH_MACHINE_SECRET=OAUTH_MACHINE_SECRET,
    OAUTH_WEBAPP_SECRET=OAUTH_WEBAPP_SECRET,
    OAUTH_JWT_KEY=OAUTH_JWT_KEY,
    OAUTH_GITHUB_KEY=OAUTH_GITHUB_KEY,
    INTEGRATIONS_KEYS=INTEGRATIONS_KEY,
    OAUTH_REDIRECT_URL=f"http://127.0.0.1:{free_port()}/oauth/callback",
    # The metrics exporter `make run` starts (issue 15), on a port of this run's own.
    METRICS_PORT=str(free_port()),
)
for _name in (
    "VAR_DIR",
    "RESULT_BACKEND_FILE",
    "DATABASE_URL_FILE",
    "BROKER_URL_FILE",
    "COORDINATION_URL",
    "FLOWER_PASSWORD_FILE",
    "MIGRATE_WAIT",
    "CLAIMS_NEVER_SET",
    "CLAIMS_NEVER_SET_FILE",
    "INTEGRATIONS_KEYS_FILE",
):
    os.environ.pop(_name, None)


def _require(url: str, what: str) -> None:
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=3).close()
    except OSError as e:
        pytest.exit(f"{what} is not reachable at {parts.hostname}:{parts.port} ({e}); start it first", 3)


def _reset_database() -> None:
    from sqlalchemy import create_engine, text

    from integrations.ledger.migrate import upgrade

    name = make_url(DATABASE_URL).database
    server = create_engine(make_url(DATABASE_URL).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:  # a second xdist process's database, made on first use
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    server.dispose()
    engine = create_engine(DATABASE_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    upgrade(DATABASE_URL)


def pytest_sessionstart(session: pytest.Session) -> None:
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        return  # pytest-xdist's controller: its processes prepare their own databases
    _require(REDIS_URL, "Redis")
    _require(DATABASE_URL, "PostgreSQL")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    _reset_database()


@pytest.fixture(scope="session")
def stub() -> Stub:
    return STUB


@pytest.fixture(scope="session")
def tls_stub() -> TlsStub:
    return TLS_STUB


@pytest.fixture(scope="session")
def app() -> Any:
    from tasks import app

    return app


@pytest.fixture(scope="session")
def worker(app: Any) -> Iterator[Any]:
    """A real Celery worker consuming the test Redis, in threads of this process."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10
    ) as w:
        yield w


@pytest.fixture
def key() -> str:
    """A fresh stub key, so each test sees only its own requests."""
    # A letter first: the CLI reads key=value as JSON, and "12e45" would be a number.
    return "k" + uuid.uuid4().hex[:11]


@pytest.fixture(scope="session")
def oauth() -> Iterator[Any]:
    """The test OAuth 2 authorization and resource server (tests/oauth_server.py), with Google
    Calendar's stand-in (tests/gcal_server.py) as ``oauth.calendar``, at OAUTH_URL."""
    from oauth_server import Client, OAuthServer

    server = OAuthServer(int(urlsplit(os.environ["OAUTH_URL"]).port or 0))
    server.add_client(Client("machine", OAUTH_MACHINE_SECRET, ("client_credentials",)))
    server.add_client(Client("webapp", OAUTH_WEBAPP_SECRET, ("authorization_code", "refresh_token")))
    jwt_bearer = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    server.add_client(Client("svcacct", None, (jwt_bearer,), public_key=OAUTH_JWT_PUBLIC))
    server.store.github_app_key = OAUTH_GITHUB_PUBLIC
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def receiver() -> Iterator[str]:
    """The webhook receiver as the app runs it (tasks.receiver), with its OAuth callback, on the
    port of OAUTH_REDIRECT_URL, where the test OAuth server sends the users' browsers back."""
    from asgi_server import serve

    from tasks.receiver import app_from_settings

    with serve(app_from_settings(), port=int(urlsplit(os.environ["OAUTH_REDIRECT_URL"]).port or 0)) as url:
        yield url


@pytest.fixture
def rabbitmq_vhost() -> Iterator[tuple[str, str]]:
    """A RabbitMQ virtual host of this test's own, deleted after: ``(name, AMQP URL)``
    (tests/rabbitmq.py). RabbitMQ not reachable: the test fails."""
    import rabbitmq

    with rabbitmq.vhost() as made:
        yield made
