"""Fixtures of the gateway tests: demo models trained once, a log database per backend, the real gateway.

Every test that takes `db_url` runs twice: on a fresh SQLite file and on an isolated PostgreSQL database created
for this test session (dropped at the end).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_models.train import train_all
from gateway.testing import GatewayProcess, run_gateway
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The same default as tests/conftest.py (which is not importable as a module from here).
PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model directory, trained once per session (a few seconds)."""
    out = tmp_path_factory.mktemp("models")
    train_all(out, rows=10_000, log=lambda _msg: None)
    return out


@pytest.fixture
def model_dir(trained_models: Path, tmp_path: Path) -> Path:
    """A private copy of the demo models (tests may change stages or add broken versions)."""
    target = tmp_path / "models"
    shutil.copytree(trained_models, target)
    return target


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of our own for this session, dropped afterwards."""
    admin_url = make_url(PG_URL)
    name = f"canary_gw_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"cannot create a PostgreSQL test database at {admin_url.render_as_string()}: {exc}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("predictions", "feedback", "routes", "unit_exposures"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty prediction log: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'predictions.db'}"
    url = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def gateway(model_dir: Path, db_url: str) -> Iterator[GatewayProcess]:
    """The real gateway on a free loopback port over the test's model copy and log."""
    with run_gateway(model_dir, db_url) as gw:
        yield gw
