"""The local stack of the demo: an Airflow home, demo models, the model gateway and simulated traffic.

Used by ``python -m canary_demo`` (the main job) and ``python -m airflow_local`` (``make airflow``). Every
process listens on 127.0.0.1 only; the gateway's admin token is random per start and reaches Airflow only
as the password of the ``canary_gateway`` connection (an ``AIRFLOW_CONN_*`` environment variable), never a
file or a log line.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class DemoError(RuntimeError):
    """A step of the demo set-up failed; the message says which, why, and where the log is."""


@dataclass(frozen=True)
class StackPaths:
    """Where the demo keeps its state (everything under one ``var`` directory, removed by ``make clean``).

    :param var: the root, ``<repo>/var`` by default.
    :param model_dir: the gateway's model directory when it is not ``var/models`` (your own models).
    """

    var: Path
    model_dir: Path | None = None

    @property
    def airflow_home(self) -> Path:
        return self.var / "airflow"

    @property
    def models(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.var / "models"

    @property
    def prediction_db(self) -> Path:
        return self.var / "predictions.db"

    @property
    def reports(self) -> Path:
        return self.var / "reports"

    @property
    def logs(self) -> Path:
        return self.var / "logs"

    def make(self) -> None:
        for p in (self.var, self.airflow_home, self.models, self.reports, self.logs):
            p.mkdir(parents=True, exist_ok=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def airflow_env(
    paths: StackPaths,
    *,
    gateway_port: int,
    token: str,
    base: dict[str, str] | None = None,
    webhook_conn: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Environment for Airflow (in this process or a child): home, folders, connections, quiet defaults.

    :param webhook_conn: optional HTTP connection (JSON fields) registered as ``canary_webhook``.
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "AIRFLOW_HOME": str(paths.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "GX_ANALYTICS_ENABLED": "False",
        "CANARY_REPORT_DIR": str(paths.reports),
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "include"), str(REPO / "plugins")]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
        "AIRFLOW_CONN_CANARY_GATEWAY": json.dumps({
            "conn_type": "http", "host": "127.0.0.1", "port": gateway_port, "schema": "http",
            "password": token, "extra": {"timeout": 10},
        }),
        "AIRFLOW_CONN_CANARY_PREDICTION_LOG": json.dumps({
            "conn_type": "sqlite", "host": str(paths.prediction_db),
        }),
    })
    if webhook_conn is not None:
        env["AIRFLOW_CONN_CANARY_WEBHOOK"] = json.dumps(webhook_conn)
    return env


def start_gateway(paths: StackPaths, token: str, port: int | None = None, timeout: float = 60.0):
    """Start the real gateway (``python -m gateway``, via ``gateway.testing.start_gateway``) on 127.0.0.1
    with the SQLite prediction log; its output goes to a file under ``var/logs``.

    Returns the ``gateway.testing.GatewayProcess`` (``.url``, ``.stop()``, ``.log_path``).
    """
    from gateway.testing import GatewayStartError
    from gateway.testing import start_gateway as _start

    try:
        return _start(paths.models, f"sqlite:///{paths.prediction_db}", token=token, port=port,
                      startup_timeout=timeout, log_dir=paths.logs)
    except GatewayStartError as exc:
        raise DemoError(f"the model gateway did not start: {exc}") from None


def new_token() -> str:
    """A fresh random admin token for the gateway (never printed)."""
    return secrets.token_urlsafe(32)
