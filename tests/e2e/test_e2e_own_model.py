"""A whole rollout of a model nobody in this repository wrote, the way docs/own-model.md tells a new user to do it.

A churn classifier on the user's own features (tenure_months, plan_price, support_tickets), trained here with
scikit-learn: stable `v1` is a naive Bayes model, candidate `v2` a shallow decision tree that makes clearly
fewer mistakes on the same process; candidate `v3` is broken (trained on inverted labels: healthy-looking
answers, mostly wrong). All are registered with `gateway.register`; the rollout spec and a
generic data-quality suite are written by the test into their own folders (`CANARY_ROLLOUTS_DIR`,
`CANARY_EXPECTATIONS_DIR`); traffic and labels are replayed from a CSV the test generates with the
simulator's replay mode. The real gateway, the real DAG file and `dag.test()`; holds of seconds as in the
demo (`canary_demo.scenario.DEMO_TIMINGS`, 10-second judge clusters).
"""

from __future__ import annotations

import json
import runpy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import requests
import sqlalchemy as sa
import yaml

MODEL = "churn"
DAG_ID = f"canary_rollout__{MODEL}"
FEATURES = ["tenure_months", "plan_price", "support_tickets"]
REPO = Path(__file__).resolve().parents[2]
RATE = 50.0


def churn_frame(n: int, seed: int, customers: int = 1500) -> pd.DataFrame:
    """Requests of `customers` customers and whether each churned: churn is likely for a short tenure with many
    support tickets, or a short tenure on an expensive plan (an interaction naive Bayes cannot express)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "customer_id": [f"cust-{u}" for u in rng.integers(0, customers, n)],
        "tenure_months": rng.integers(1, 72, n),
        "plan_price": rng.uniform(10, 120, n).round(2),
        "support_tickets": rng.poisson(1.5, n),
    })
    hot = ((df.support_tickets >= 3) & (df.tenure_months < 24)) | ((df.plan_price > 90) & (df.tenure_months < 12))
    df["churned"] = (rng.random(n) < np.where(hot, 0.9, 0.08)).astype(int)
    return df


def churn_spec() -> dict[str, Any]:
    """The user's rollout spec: docs/spec.md's metrics for a classifier with labels, holds of seconds."""
    return {
        "model": MODEL,
        "description": "Churn classifier (a model nobody in this repository wrote).",
        "owner": "e2e",
        "steps": [20, 50],
        "hold": {"min_duration": 20, "min_samples": 150, "max_wait": 150, "poll_interval": 2},
        "clusters": {"width": 10, "min_per_arm": 3},
        "lease": 60,
        "deadline": 600,
        "metrics": [
            {"name": "error_rate", "source": "error", "kind": "binary", "direction": "decrease",
             "margin": 0.01, "margin_type": "absolute", "critical": True},  # 1 point: few requests here
            {"name": "latency_p95_exceed", "source": "latency_ms", "kind": "latency_threshold",
             "threshold": "baseline_p95", "direction": "decrease", "margin": 0.05, "margin_type": "absolute"},
            {"name": "mistake_rate", "source": "mismatch", "kind": "binary", "direction": "decrease",
             "margin": 0.1, "margin_type": "relative", "label_delay": 4},
        ],
        "data_quality": {"suite": MODEL, "sample_size": 2000},
        "drift": {"features": "all"},
        "post_deploy": {"window": 10, "min_samples": 50},
    }


def generic_suite(features: list[str]) -> dict[str, Any]:
    """The data-quality suite a new user writes: the logged columns exist, scores are probabilities, predictions
    are the model's classes, no missing answers (docs/own-model.md)."""
    exist = [{"type": "expect_column_to_exist", "kwargs": {"column": c}}
             for c in ["prediction", "score", "latency_ms", *features]]
    return {"name": MODEL, "expectations": [
        *exist,
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "prediction", "mostly": 0.999}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "score", "mostly": 0.99}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "score", "min_value": 0.0,
                                                                   "max_value": 1.0}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "prediction", "value_set": [0, 1]}},
    ]}


class Replay:
    """The simulator's CSV replay in a background thread until `stop()`."""

    def __init__(self, url: str, csv: Path) -> None:
        self.url, self.csv = url, csv
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.summary: dict | None = None
        self.thread = threading.Thread(target=self._body, daemon=True, name="e2e-replay")

    def _body(self) -> None:
        import simulator

        try:
            self.summary = simulator.run(self.url, MODEL, rate=RATE, duration=24 * 3600, label_delay=1.0,
                                         csv=self.csv, label_column="churned", unit_column="customer_id",
                                         stop_event=self.stop_event, flush_feedback=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(15)


def _read_run(dr: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
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
    return str(getattr(dr.state, "value", dr.state)), states, xcoms


@dataclass
class OwnStack:
    """The user's set-up: models registered, spec and suite written, gateway up, replay running."""

    gateway: Any
    models: Path
    registered: dict[str, dict]

    def rollout(self, conf: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any], float]:
        """Trigger the churn rollout like the UI form (dag.test); return state, task states, XComs, seconds."""
        from airflow.sdk import DAG

        namespace = runpy.run_path(str(REPO / "dags" / "canary_rollouts.py"))
        dag = {v.dag_id: v for v in namespace.values() if isinstance(v, DAG)}[DAG_ID]
        started = time.monotonic()
        dr = dag.test(run_conf=conf)
        return (*_read_run(dr), time.monotonic() - started)

    def get(self, path: str) -> Any:
        return requests.get(f"{self.gateway.url}{path}", timeout=10).json()


@pytest.fixture
def own_stack(airflow_db, tmp_path, monkeypatch) -> Iterator[OwnStack]:
    from canary.spec import load_spec
    from gateway.register import register_version
    from gateway.testing import start_gateway
    from sklearn.naive_bayes import GaussianNB
    from sklearn.tree import DecisionTreeClassifier

    # 1. the user's models, trained on their own data and dumped with joblib; v3 is broken: trained on
    #    labels inverted by an upstream bug (it looks confident and is wrong most of the time)
    train, holdout = churn_frame(5000, 1), churn_frame(2000, 2)
    joblib.dump(GaussianNB().fit(train[FEATURES], train.churned), tmp_path / "churn_nb.joblib")
    tree = DecisionTreeClassifier(max_depth=5, random_state=0)
    joblib.dump(tree.fit(train[FEATURES], train.churned), tmp_path / "churn_tree.joblib")
    inverted = DecisionTreeClassifier(max_depth=5, random_state=0).fit(train[FEATURES], 1 - train.churned)
    joblib.dump(inverted, tmp_path / "churn_inverted.joblib")
    holdout.to_csv(tmp_path / "holdout.csv", index=False)
    churn_frame(6000, 3).to_csv(tmp_path / "traffic.csv", index=False)

    # 2. registered with gateway.register (v1 in production, v2 and v3 candidates)
    models = tmp_path / "models"
    common = {"eval_csv": tmp_path / "holdout.csv", "label_column": "churned"}
    registered = {
        "v1": register_version(models, MODEL, "v1", tmp_path / "churn_nb.joblib", "classifier",
                               stage="production", description="naive Bayes", **common),
        "v2": register_version(models, MODEL, "v2", tmp_path / "churn_tree.joblib", "classifier",
                               description="decision tree, depth 5", **common),
        "v3": register_version(models, MODEL, "v3", tmp_path / "churn_inverted.joblib", "classifier",
                               description="decision tree on inverted labels (broken)"),
    }

    # 3. the spec and the data-quality suite, in the user's own folders
    rollouts, expectations = tmp_path / "rollouts", tmp_path / "expectations"
    rollouts.mkdir()
    expectations.mkdir()
    (rollouts / f"{MODEL}.yaml").write_text(yaml.safe_dump(churn_spec(), sort_keys=False))
    (expectations / f"{MODEL}.json").write_text(json.dumps(generic_suite(FEATURES), indent=1))
    load_spec(rollouts / f"{MODEL}.yaml")  # the loader names the field when the spec is wrong

    # 4. gateway, connections, replayed traffic with labels
    db_path = tmp_path / "predictions.db"
    gw = start_gateway(models, f"sqlite:///{db_path}", extra_args=["--lease-check-interval", "0.2"])
    replay = None
    try:
        monkeypatch.setenv("CANARY_ROLLOUTS_DIR", str(rollouts))
        monkeypatch.setenv("CANARY_EXPECTATIONS_DIR", str(expectations))
        monkeypatch.setenv("CANARY_REPORT_DIR", str(tmp_path / "reports"))
        monkeypatch.setenv("AIRFLOW_CONN_CANARY_PREDICTION_LOG",
                           json.dumps({"conn_type": "sqlite", "host": str(db_path)}))
        port = int(gw.url.rsplit(":", 1)[1])
        monkeypatch.setenv("AIRFLOW_CONN_CANARY_GATEWAY", json.dumps({
            "conn_type": "http", "host": "127.0.0.1", "port": port, "password": gw.token,
            "extra": {"timeout": 5, "max_retries": 1, "backoff": 0.2},
        }))
        replay = Replay(gw.url, tmp_path / "traffic.csv")
        replay.thread.start()
        engine = sa.create_engine(f"sqlite:///{db_path}")
        deadline = time.monotonic() + 60
        warm = 0
        while warm < 200 and time.monotonic() < deadline:  # the pre-flight needs a baseline of stable traffic
            assert replay.error is None, replay.error
            time.sleep(0.5)
            try:
                with engine.connect() as db:
                    warm = db.execute(sa.text("SELECT COUNT(*) FROM predictions WHERE model = :m"),
                                      {"m": MODEL}).scalar()
            except sa.exc.DBAPIError:
                warm = 0
        engine.dispose()
        assert warm >= 200, f"only {warm} predictions logged during the warm-up"
        yield OwnStack(gw, models, registered)
        assert replay.error is None, replay.error
    finally:
        if replay is not None:
            replay.stop()
        gw.stop()


def _summary(state: str, states: dict, analyses: list[dict], seconds: float) -> str:
    return json.dumps({"state": state, "states": states, "seconds": round(seconds),
                       "decisions": [(a["verdict"]["decision"], a["verdict"]["reason"]) for a in analyses]},
                      indent=1, default=str)


def _analyses(xcoms: dict[str, Any]) -> list[dict]:
    return [xcoms[k] for k in sorted(k for k in xcoms if k.endswith(".analyze"))]


def test_own_churn_model_better_candidate_is_promoted(own_stack):
    v1, v2 = own_stack.registered["v1"], own_stack.registered["v2"]
    assert v2["eval_metrics"]["accuracy"] > v1["eval_metrics"]["accuracy"] + 0.03, (v1, v2)

    state, states, xcoms, seconds = own_stack.rollout({"candidate": "v2"})
    route = own_stack.get(f"/v1/models/{MODEL}/route")
    listing = own_stack.get("/v1/models")["models"]

    analyses = _analyses(xcoms)
    summary = _summary(state, states, analyses, seconds)
    assert state == "success", summary
    assert states["promote"] == "success" and states["drift_check"] == "success", summary
    assert [a["verdict"]["decision"] for a in analyses][-1] == "promote", summary
    last = analyses[-1]["verdict"]
    mistakes = next(m for m in last["metrics"] if m["name"] == "mistake_rate")
    assert mistakes["tested"] and mistakes["non_inferior"], mistakes
    assert last["data_quality"]["success"], last["data_quality"]  # the generic suite passed on the canary's rows
    assert route["stable"] == "v2" and route["canary"] is None and route["canary_percent"] == 0, route
    stages = {v["version"]: v["stage"] for m in listing if m["model"] == MODEL for v in m["versions"]}
    assert stages == {"v1": "archived", "v2": "production", "v3": "candidate"}, stages
    assert xcoms["report"]["outcome"] == "promoted" and Path(xcoms["report"]["path"]).is_file()
    print(f"own-model rollout: promoted in {seconds:.0f} s ({len(analyses)} steps)")


def test_own_churn_model_broken_candidate_is_rolled_back(own_stack):
    """v3 answers like a healthy model (no errors, scores in range, same speed: data quality passes) but is
    wrong most of the time: the mistake rate shows the harm and the rollout rolls it back."""
    state, states, xcoms, seconds = own_stack.rollout({"candidate": "v3"})
    route = own_stack.get(f"/v1/models/{MODEL}/route")
    listing = own_stack.get("/v1/models")["models"]

    analyses = _analyses(xcoms)
    summary = _summary(state, states, analyses, seconds)
    assert state == "failed", summary  # a rolled-back run ends failed on purpose
    assert states["rollback"] == "failed" and states["promote"] in ("skipped", "upstream_failed"), summary
    assert analyses and analyses[-1]["verdict"]["decision"] == "rollback", summary
    rolled = xcoms["rollback:rollback"]
    assert "mistake_rate" in json.dumps(rolled["root_cause"]["failing_metrics"]), rolled["root_cause"]
    assert route["stable"] == "v1" and route["canary_percent"] == 0, route
    stages = {v["version"]: v["stage"] for m in listing if m["model"] == MODEL for v in m["versions"]}
    assert stages["v1"] == "production" and stages["v3"] == "candidate", stages
    assert xcoms["report"]["outcome"] == "rolled_back"
    print(f"own-model rollout: rolled back in {seconds:.0f} s ({len(analyses)} steps)")
