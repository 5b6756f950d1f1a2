"""End-to-end fixtures: a migrated Airflow DB, the real gateway on loopback, simulator traffic, dag.test().

Everything is real: `airflow db migrate` on the temporary AIRFLOW_HOME of tests/conftest.py, the gateway
process (`gateway.testing`), the prediction log on a SQLite file or a private PostgreSQL database, traffic
and labels from the project's simulator, and the DAG built by `dags/canary_rollouts.py` from a spec with
holds of seconds (written to a temporary rollouts folder, `CANARY_ROLLOUTS_DIR`). Airflow connections are
`AIRFLOW_CONN_<ID>` environment variables (JSON), as in a container.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import yaml
from pause_answer import PauseAnswer  # noqa: F401 (tests/e2e import it from here)

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "canary_rollouts.py"
DAG_ID = "canary_rollout__fraud"
PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")

#: The spec of the end-to-end runs: the real fraud spec with holds of seconds.
E2E_TIMINGS: dict[str, Any] = {
    "steps": [10, 50],
    "hold": {"min_duration": 5, "min_samples": 40, "max_wait": 150, "poll_interval": 1},
    "clusters": {"width": 10, "min_per_arm": 3},  # holds of seconds need clusters of seconds (docs/spec.md)
    "lease": 20,
    "deadline": 600,
    "post_deploy": {"window": 3, "min_samples": 20},
    "label_delay": 1,
}
TRAFFIC_RATE = 40.0


# --------------------------------------------------------------------------------------------- Airflow


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """`airflow db migrate` once per session on the temporary AIRFLOW_HOME (idempotent)."""
    home = os.environ["AIRFLOW_HOME"]
    airflow = Path(sys.executable).with_name("airflow")
    cmd = [str(airflow)] if airflow.exists() else [sys.executable, "-m", "airflow"]
    proc = subprocess.run([*cmd, "db", "migrate"], env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"`airflow db migrate` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return home


def write_e2e_spec(folder: Path, drop_metrics: tuple[str, ...] = (), **changes: Any) -> Path:
    """The fraud spec with the e2e timings in ``folder`` (optionally without some metrics, and with top-level
    ``changes`` such as ``schedule`` or ``notifications``)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((REPO / "include" / "rollouts" / "fraud.yaml").read_text())
    spec["metrics"] = [m for m in spec["metrics"] if m["name"] not in drop_metrics]
    spec.update(changes)
    t = E2E_TIMINGS
    spec["steps"] = list(t["steps"])
    spec["hold"] = dict(t["hold"])
    spec["clusters"] = dict(t["clusters"])
    spec["lease"], spec["deadline"] = t["lease"], t["deadline"]
    spec["post_deploy"] = dict(t["post_deploy"])
    for metric in spec.get("metrics", []):
        if metric.get("label_delay") is not None:
            metric["label_delay"] = t["label_delay"]
    (folder / "fraud.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def rollouts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rollouts folder holding the fraud spec with the e2e timings (the DAG file reads it at parse time)."""
    return write_e2e_spec(tmp_path_factory.mktemp("rollouts"))


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, trained once per session."""
    from demo_models.train import train_all

    out = tmp_path_factory.mktemp("models")
    train_all(out, log=lambda _msg: None)
    return out


# ------------------------------------------------------------------------------------------ log stores


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(PG_URL), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@dataclass
class LogStore:
    """Where the gateway writes and the DAG reads the prediction log.

    :param db_url: SQLAlchemy URL for the gateway.
    :param conn: the Airflow connection (dict) for `canary_prediction_log`.
    """

    db_url: str
    conn: dict[str, Any]
    cleanup: Any = None


def sqlite_store(tmp_path: Path) -> LogStore:
    path = tmp_path / "predictions.db"
    return LogStore(f"sqlite:///{path}", {"conn_type": "sqlite", "host": str(path)})


def postgres_store(pg_admin: sa.Engine) -> LogStore:
    name = f"canary_e2e_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as db:
        db.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_admin.url.set(database=name)

    def drop() -> None:
        with pg_admin.connect() as db:
            db.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    conn = {"conn_type": "postgres", "host": url.host, "port": url.port or 5432, "login": url.username,
            "schema": name}
    if url.password:
        conn["password"] = url.password
    return LogStore(url.render_as_string(hide_password=False), conn, drop)


# --------------------------------------------------------------------------------------------- traffic


class Traffic:
    """The project's simulator in a background thread (requests plus label feedback) until `stop()`."""

    def __init__(self, url: str, model: str = "fraud", rate: float = TRAFFIC_RATE, seed: int = 0) -> None:
        self.url, self.model, self.rate, self.seed = url, model, rate, seed
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._body, daemon=True, name="e2e-traffic")

    def _body(self) -> None:
        import simulator

        try:
            simulator.run(self.url, self.model, rate=self.rate, duration=24 * 3600, units=2000,
                          label_delay=E2E_TIMINGS["label_delay"] / 2, seed=self.seed, stop_event=self._stop,
                          flush_feedback=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# ------------------------------------------------------------------------------------------ webhook


class _WebhookRecorder(BaseHTTPRequestHandler):
    """A real HTTP webhook on loopback: records every POST's JSON body and answers 200."""

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(json.loads(body or b"null"))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A webhook receiver and its Airflow connection ``canary_e2e_webhook``; ``.received`` holds the bodies."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WebhookRecorder)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="e2e-webhook")
    thread.start()
    monkeypatch.setenv("AIRFLOW_CONN_CANARY_E2E_WEBHOOK", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": server.server_port, "schema": "http",
        "extra": {"endpoint": "/canary", "timeout": 5, "retries": 1},
    }))
    server.conn_id = "canary_e2e_webhook"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def webhook_rollouts(tmp_path: Path, webhook: Any) -> Path:
    """A rollouts folder with the e2e fraud spec notifying ``webhook``, on a schedule (so a run's candidate may
    be left to pre-flight, as a scheduled run's is)."""
    return write_e2e_spec(tmp_path / "webhook_rollouts", schedule="@daily",
                          notifications={"webhook_conn_id": webhook.conn_id, "email": []})


# ------------------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """One end-to-end environment: gateway, log store, traffic, Airflow connections, the DAG."""

    gateway: Any
    store: LogStore
    model_dir: Path
    monkeypatch: pytest.MonkeyPatch
    traffic: Traffic | None = None
    extra_gateways: list[Any] = field(default_factory=list)

    def route(self) -> dict[str, Any]:
        return requests.get(f"{self.gateway.url}/v1/models/fraud/route", timeout=10).json()

    def set_gateway(self, gw: Any) -> None:
        """Point the `canary_gateway` connection (and the traffic) at ``gw``."""
        self.gateway = gw
        host, port = gw.url.rsplit("//", 1)[1].split(":")
        self.monkeypatch.setenv("AIRFLOW_CONN_CANARY_GATEWAY", json.dumps({
            "conn_type": "http", "host": host, "port": int(port), "password": gw.token,
            "extra": {"timeout": 5, "max_retries": 1, "backoff": 0.2},
        }))

    def start_traffic(self, warmup_rows: int = 150, timeout: float = 60.0) -> None:
        """Start the simulator and wait until the log has ``warmup_rows`` stable rows (the baseline)."""
        self.traffic = Traffic(self.gateway.url).start()
        engine = sa.create_engine(self.store.db_url)
        try:
            deadline = time.monotonic() + timeout
            n = 0
            while time.monotonic() < deadline:
                if self.traffic.error:
                    raise AssertionError(f"the simulator stopped: {self.traffic.error!r}")
                try:
                    with engine.connect() as db:
                        n = db.execute(sa.text("SELECT COUNT(*) FROM predictions WHERE model = 'fraud'")).scalar()
                except sa.exc.DBAPIError:
                    n = 0
                if n >= warmup_rows:
                    return
                time.sleep(0.5)
            raise AssertionError(f"only {n} predictions logged after {timeout}s of simulator traffic")
        finally:
            engine.dispose()

    def run(self, conf: dict[str, Any], *, retries: int | None = 0, instrument: Any = None) -> RunResult:
        """Trigger the fraud rollout with ``conf`` (the trigger form's values) via dag.test().

        :param retries: task retries for this run (0 keeps failure tests fast; None keeps the DAG's).
        :param instrument: called with the DAG before the run (fault injection).
        """
        dag = load_dag()
        if retries is not None:
            for task in dag.tasks:
                task.retries = retries
        if instrument is not None:
            instrument(dag)
        started = time.monotonic()
        dr = dag.test(run_conf=conf)
        return read_run(dr, time.monotonic() - started)


def load_dag() -> Any:
    """The fraud rollout DAG, parsed from the real DAG file like the DAG processor does."""
    from airflow.sdk import DAG

    namespace = runpy.run_path(str(DAG_FILE))
    dags = {v.dag_id: v for v in namespace.values() if isinstance(v, DAG)}
    return dags[DAG_ID]


@dataclass
class RunResult:
    """What a dag.test() run left behind: run state, task states, XComs."""

    state: str
    run_id: str
    seconds: float
    states: dict[str, str]
    xcoms: dict[str, Any]

    def analyses(self) -> list[dict[str, Any]]:
        keys = sorted((k for k in self.xcoms if k.endswith(".analyze")), key=lambda k: int(k.split("_")[1].split(".")[0]))
        return [self.xcoms[k] for k in keys]

    def decisions(self) -> list[str]:
        return [a["verdict"]["decision"] for a in self.analyses()]

    def summary(self) -> str:
        return json.dumps({"state": self.state, "states": self.states,
                           "decisions": [(a["verdict"]["decision"], a["verdict"]["reason"]) for a in self.analyses()]},
                          indent=1, default=str)


def read_run(dr: Any, seconds: float) -> RunResult:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == DAG_ID,
                                                         TaskInstance.run_id == dr.run_id)).all()
        states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}
        rows = session.scalars(select(XComModel).where(XComModel.dag_id == DAG_ID,
                                                       XComModel.run_id == dr.run_id)).all()
        xcoms = {r.task_id if r.key == "return_value" else f"{r.task_id}:{r.key}": r.value for r in rows}
    return RunResult(str(getattr(dr.state, "value", dr.state)), dr.run_id, seconds, states, xcoms)


@pytest.fixture
def make_stack(airflow_db, rollouts_dir, trained_models, tmp_path, monkeypatch, pg_admin) -> Iterator[Any]:
    """Factory: ``make_stack(store="sqlite" | "postgres")`` starts the gateway and sets the connections."""
    from gateway.testing import start_gateway

    made: list[Stack] = []

    def make(store: str = "sqlite", rollouts: Path | None = None) -> Stack:
        models = tmp_path / "models"
        shutil.copytree(trained_models, models)
        log_store = sqlite_store(tmp_path) if store == "sqlite" else postgres_store(pg_admin)
        gw = start_gateway(models, log_store.db_url, extra_args=["--lease-check-interval", "0.2"])
        monkeypatch.setenv("CANARY_ROLLOUTS_DIR", str(rollouts or rollouts_dir))
        monkeypatch.setenv("CANARY_REPORT_DIR", str(tmp_path / "reports"))
        monkeypatch.setenv("AIRFLOW_CONN_CANARY_PREDICTION_LOG", json.dumps(log_store.conn))
        stack = Stack(gw, log_store, models, monkeypatch)
        stack.set_gateway(gw)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        if stack.traffic:
            stack.traffic.stop()
        for gw in [stack.gateway, *stack.extra_gateways]:
            if gw.running:
                gw.stop()
        if stack.store.cleanup:
            stack.store.cleanup()
