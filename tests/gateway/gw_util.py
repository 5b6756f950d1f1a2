"""Helpers shared by the gateway tests (imported as a plain module: tests/gateway is on sys.path)."""

from __future__ import annotations

import numpy as np
import requests
from demo_models.data import Population
from gateway.testing import GatewayProcess
from sqlalchemy import create_engine, text


def query(db_url: str, sql: str, **params: object) -> list[tuple]:
    """Rows of a SQL query against the log database."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def fraud_requests(n: int, seed: int = 0, units: int = 500) -> list[dict]:
    """`n` predict bodies from the fraud process, unit ids `u<index>`."""
    batch = Population("fraud", units, seed=seed).draw(np.random.default_rng(seed), n)
    return [
        {"unit_id": f"u{unit}", "features": features}
        for unit, features in zip(batch.units.tolist(), batch.records(), strict=True)
    ]


def predict(session: requests.Session, gw: GatewayProcess, body: dict, model: str = "fraud") -> requests.Response:
    """POST one prediction."""
    return session.post(f"{gw.url}/v1/models/{model}/predict", json=body, timeout=30)
