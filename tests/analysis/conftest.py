"""Fixtures for the analysis tests: a private PostgreSQL database per session (dropped afterwards)."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text

PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_engine():
    """A uniquely named PostgreSQL database, dropped after the session (other engineers share the server)."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"canary_analysis_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only when PostgreSQL is down
        pytest.fail(f"PostgreSQL at {PG_URL} is needed for the SQL tests: {exc}")
    eng = create_engine(PG_URL.rsplit("/", 1)[0] + f"/{name}")
    yield eng
    eng.dispose()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
