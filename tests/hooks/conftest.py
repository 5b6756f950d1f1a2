"""Fixtures for the hook tests: real SQLite files, a private PostgreSQL database, Airflow connections as env vars."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

# The same default as tests/conftest.py (which is not importable as a package module).
PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")



@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch):
    """Define an Airflow connection the way users do in containers: AIRFLOW_CONN_<ID> as JSON."""

    def _set(conn_id: str, **fields: object) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))

    return _set


@pytest.fixture(scope="session")
def pg_database() -> Iterator[sa.engine.URL]:
    """A uniquely named PostgreSQL database for this session (other engineers share the server); dropped after."""
    admin_url = sa.make_url(PG_URL)
    name = f"canary_hooks_{uuid.uuid4().hex[:10]}"
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as db:
            db.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - environment problem, said plainly
        pytest.fail(f"PostgreSQL at {admin_url.render_as_string(hide_password=True)} is not reachable: {exc}")
    try:
        yield admin_url.set(database=name)
    finally:
        with admin.connect() as db:
            db.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
            ), {"n": name})
            db.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory):
    """The demo model directory, trained once per session (a few seconds)."""
    from demo_models.train import train_all

    out = tmp_path_factory.mktemp("models")
    train_all(out, rows=10_000, log=lambda _msg: None)
    return out


@pytest.fixture
def gateway(trained_models, tmp_path):
    """The real gateway on a free loopback port, a private copy of the models, a fresh SQLite log."""
    import shutil

    from gateway.testing import run_gateway

    models = tmp_path / "models"
    shutil.copytree(trained_models, models)
    with run_gateway(models, f"sqlite:///{tmp_path / 'log.db'}", token="hook-test-token-123") as gw:
        gw.model_dir = models
        yield gw


@pytest.fixture
def router_conn(gateway, set_conn):
    """An Airflow connection `canary_test_gw` for the gateway (the token as the password)."""
    from urllib.parse import urlparse

    u = urlparse(gateway.url)
    set_conn("canary_test_gw", conn_type="http", host=u.hostname, port=u.port, password=gateway.token,
             extra={"timeout": 5, "max_retries": 2, "backoff": 0.05})
    return "canary_test_gw"
