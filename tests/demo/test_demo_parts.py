"""The main job's parts that can be checked without running the rollouts (tests/e2e runs whole DAGs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from canary_demo.runs import Look, RolloutResult, check, output_to
from canary_demo.scenario import CASES, MODEL, SPECS, write_demo_spec, write_demo_specs


def test_demo_specs_are_the_real_specs_with_short_holds(tmp_path):
    from canary.spec import load_spec

    paths = write_demo_specs(tmp_path)
    assert sorted(p.name for p in paths) == sorted(p.name for p in SPECS.glob("*.yaml"))
    for path in paths:
        demo, real = load_spec(path), load_spec(SPECS / path.name)
        assert demo.hold.min_duration <= 30 and demo.hold.poll_interval <= 5 and demo.post_deploy.window <= 30
        assert real.hold.min_duration > demo.hold.min_duration
        # holds of seconds need clusters of seconds (a minute cluster could not be tested in a 20 s hold)
        assert demo.clusters.width == 10 and demo.clusters.width < real.clusters.width
        assert demo.policy().cluster_seconds == 10
        # everything that decides is the real spec's
        assert demo.metrics and [m.name for m in demo.metrics] == [m.name for m in real.metrics]
        assert [m.margin for m in demo.metrics] == [m.margin for m in real.metrics]
        assert demo.alpha == real.alpha and demo.steps == real.steps


def test_every_case_conf_passes_the_trigger_validation(tmp_path):
    from canary.spec import load_spec

    path = write_demo_spec(tmp_path)
    expects = set()
    for case in CASES:
        spec = load_spec(path, params=case.conf(), require_candidate=True)
        assert spec.candidate == case.candidate
        assert list(spec.steps) == case.params["steps"]
        expects.add(case.expect)
    assert expects == {"promoted", "rolled_back"}


def test_the_dag_factory_builds_the_demo_dag(tmp_path):
    from canary.dag_factory import build_dags

    write_demo_spec(tmp_path)
    dags = build_dags(tmp_path)
    dag = dags[f"canary_rollout__{MODEL}"]
    assert {"validate", "preflight", "promote", "rollback", "report", "fail_safe"} <= set(dag.task_ids)


def _result(tmp_path: Path, case, *, state: str, decision: str, route: dict, promote_state: str | None,
            report: bool = True) -> RolloutResult:
    report_path = tmp_path / ("r.html" if report else "never-written.html")
    if report:
        report_path.write_text("<html></html>")
    states = {"validate": "success", "step_1.analyze": "success"}
    if promote_state:
        states["promote"] = promote_state
    if decision == "rollback":
        states["rollback"] = "failed"
    return RolloutResult(case=case, run_id="r", state=state, seconds=1.0, task_states=states,
                         looks=[Look(1, decision, f"because {decision}", None)], steps=[10.0], route=route,
                         report_path=str(report_path), errors=[], log_path=tmp_path / "log")


def test_check_accepts_the_expected_outcomes(tmp_path):
    good, bad = (next(c for c in CASES if c.expect == e) for e in ("promoted", "rolled_back"))
    promoted = _result(tmp_path, good, state="success", decision="promote", promote_state="success",
                       route={"stable": good.candidate, "canary": None, "canary_percent": 0})
    assert promoted.outcome == "promoted" and check(promoted, "v1") == []
    rolled = _result(tmp_path, bad, state="failed", decision="rollback", promote_state=None,
                     route={"stable": "v2", "canary": bad.candidate, "canary_percent": 0})
    assert rolled.outcome == "rolled_back" and check(rolled, "v2") == []


def test_check_flags_every_unexpected_outcome(tmp_path):
    good, bad = (next(c for c in CASES if c.expect == e) for e in ("promoted", "rolled_back"))
    # the good candidate rolled back
    r = _result(tmp_path, good, state="failed", decision="rollback", promote_state=None,
                route={"stable": "v1", "canary": good.candidate, "canary_percent": 0})
    problems = check(r, "v1")
    assert any(f"expected the candidate {good.candidate} to be promoted" in p for p in problems)
    assert any("stable is v1" in p for p in problems)
    # the bad candidate promoted
    r = _result(tmp_path, bad, state="success", decision="promote", promote_state="success",
                route={"stable": bad.candidate, "canary": None, "canary_percent": 0})
    assert any("to be rolled back" in p for p in check(r, "v2"))
    # rolled back at the cap (inconclusive), not on evidence
    r = _result(tmp_path, bad, state="failed", decision="extend", promote_state=None,
                route={"stable": "v2", "canary": bad.candidate, "canary_percent": 0})
    r.task_states["rollback"] = "failed"
    assert r.outcome == "rolled_back"
    assert any("did not decide rollback on evidence" in p and "on_inconclusive" in p for p in check(r, "v2"))
    # a run that failed on an error, without a rollback
    r.task_states.pop("rollback")
    r.task_states["preflight"] = "failed"
    assert r.outcome == "failed" and any("outcome failed" in p for p in check(r, "v2"))
    # traffic left on the canary, no report
    r = _result(tmp_path, bad, state="failed", decision="rollback", promote_state=None, report=False,
                route={"stable": "v2", "canary": bad.candidate, "canary_percent": 10})
    problems = check(r, "v2")
    assert any("still has 10 %" in p for p in problems) and any("no HTML report" in p for p in problems)


def test_output_to_captures_task_output_at_the_file_descriptor_level(tmp_path):
    log = tmp_path / "run.log"
    with output_to(log) as console:
        os.write(1, b"from fd 1\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('from a child\\n')"], check=True)
        console.write("")
    text = log.read_text()
    assert "from fd 1" in text and "from a child" in text


def test_demo_refuses_to_pretend_without_a_dag_file(tmp_path, monkeypatch):
    import canary_demo.runs as runs
    from canary_demo.stack import DemoError

    monkeypatch.setattr(runs, "DAG_FILE", tmp_path / "missing.py")
    with pytest.raises(DemoError, match="does not exist"):
        runs.load_dag("canary_rollout__fraud")


def test_the_demo_webhook_receives_notify_payloads_with_its_token(monkeypatch):
    import json

    import requests
    from canary.notify import notify
    from canary_demo.webhook import WebhookReceiver

    receiver = WebhookReceiver("demo-token-0123456789").start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_CANARY_WEBHOOK", json.dumps(receiver.connection()))
        results = notify("rollback", {"model": "fraud", "candidate": "v4", "run_id": "r-1", "reason": "harm"},
                         {"webhook_conn_id": "canary_webhook", "email": []})
        assert [r.ok for r in results] == [True]
        assert receiver.events_for("r-1") == ["rollback"] and receiver.events_for("other") == []
        wrong = requests.post(f"http://127.0.0.1:{receiver.port}/canary", json={"run_id": "r-1"},
                              headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 403 and receiver.rejected == 1 and len(receiver.payloads) == 1
    finally:
        receiver.stop()


def test_the_good_candidate_is_more_accurate_than_stable_and_served_like_it(tmp_path):
    """fraud/v5 as the demo registers it: its serving form gives exactly the fitted pipeline's scores, it
    makes fewer mistakes than v1 on fresh traffic, and the real gateway loads and serves it (registry)."""
    from datetime import datetime

    import joblib
    import numpy as np
    import requests
    from canary_demo.candidate import CANDIDATE, LinearScorer, register_good_candidate
    from demo_models.data import generate
    from demo_models.train import PLANS, train_version, write_version
    from gateway.testing import run_gateway

    v1 = next(p for p in PLANS if p.model == "fraud" and p.version == "v1")
    write_version(tmp_path, *train_version(v1, 20_000, datetime(2026, 1, 1)))
    target = register_good_candidate(tmp_path)
    assert target == tmp_path / "fraud" / CANDIDATE
    scorer = joblib.load(target / "model.joblib")
    assert isinstance(scorer, LinearScorer)
    batch = generate("fraud", 20_000, seed=4242)
    np.testing.assert_allclose(scorer.predict_proba(batch.features),
                               scorer.estimator.predict_proba(batch.features), rtol=0, atol=1e-12)
    stable = joblib.load(tmp_path / "fraud" / "v1" / "model.joblib")
    mistakes = {name: float((est.predict(batch.features) != batch.labels).mean())
                for name, est in (("v1", stable), ("v5", scorer))}
    assert mistakes["v5"] < mistakes["v1"] * 0.9, mistakes  # beyond the spec's 10 % relative margin

    with run_gateway(tmp_path, f"sqlite:///{tmp_path / 'log.db'}", token="t0ken") as gw:
        r = gw.set_route("fraud", stable="v1", canary=CANDIDATE, canary_percent=100, lease_seconds=60)
        assert r.status_code == 200, r.text
        row = batch.records()[0]
        answer = requests.post(f"{gw.url}/v1/models/fraud/predict", json={"features": row, "unit_id": "u1"},
                               timeout=10).json()
        assert answer["version"] == CANDIDATE
        assert answer["score"] == pytest.approx(float(scorer.predict_proba(batch.features[:1])[0, 1]))
        meta = requests.get(f"{gw.url}/v1/models/fraud/versions/{CANDIDATE}", timeout=10).json()
        assert meta["loadable"] and meta["params"]["wrapper"] == "LinearScorer"


def test_a_broken_user_spec_does_not_stop_the_others(tmp_path):
    """make airflow copies every spec with short holds; a user's spec with a mistake is copied unchanged
    (Airflow then shows its broken-spec DAG with the message) instead of crashing the start-up."""
    from canary.spec import load_spec

    src = tmp_path / "src"
    src.mkdir()
    (src / "fraud.yaml").write_text((SPECS / "fraud.yaml").read_text())
    (src / "churn.yaml").write_text((SPECS / "fraud.yaml").read_text().replace("model: fraud", "model: churn")
                                    .replace("steps: [1, 5, 25, 50]", "steps: [50, 5]"))
    (src / "bad_yaml.yaml").write_text("model: x\nsteps: [1, 2\n")
    warnings: list[str] = []
    paths = write_demo_specs(tmp_path / "out", source_dir=src, warn=warnings.append)
    assert sorted(p.name for p in paths) == ["bad_yaml.yaml", "churn.yaml", "fraud.yaml"]
    assert load_spec(tmp_path / "out" / "fraud.yaml").hold.min_duration <= 30
    assert (tmp_path / "out" / "churn.yaml").read_text() == (src / "churn.yaml").read_text()
    assert len(warnings) == 2 and any("churn.yaml" in w and "steps" in w for w in warnings), warnings
