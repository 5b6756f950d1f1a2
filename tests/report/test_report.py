"""The run report rendered from real judge output on generated data (no hand-written verdicts)."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from canary.analysis import MetricPolicy, Policy, judge
from canary.analysis.stats import t_to_z
from canary.report import ReportError, build_run, metric_points, render_report, traffic_series, write_report

T0 = datetime(2026, 11, 27, 10, 0, 0)
STEPS = [(1, 10.0), (2, 50.0)]


def _policy() -> Policy:
    return Policy(
        metrics=(
            MetricPolicy("error_rate", "error", "binary", "decrease", margin=0.01, critical=True),
            MetricPolicy("latency_ms", "latency_ms", "continuous", "decrease", margin=5.0),
        ),
        planned_looks=2,
        min_samples=30,
        min_clusters=3,
    )


def _frame(rng, step: int, percent: float, start: datetime, canary_error: float, latency_shift: float,
           n: int = 6000) -> pd.DataFrame:
    """Requests of one step over 6 minutes: stable errs 2 %, the canary ``canary_error``."""
    canary = rng.random(n) < percent / 100
    err = np.where(canary, rng.random(n) < canary_error, rng.random(n) < 0.02).astype(float)
    lat = rng.normal(40, 5, n) + np.where(canary, latency_shift, 0.0)
    ts = [start + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, 360, n))]
    return pd.DataFrame({"arm": np.where(canary, "canary", "stable"), "step": step, "ts": ts,
                         "percent": percent, "error_rate": err, "latency_ms": lat})


def _run(canary_error: float, seed: int = 7) -> tuple[dict, list]:
    """Judge every step like the runtime does (observations of all steps so far) and build the run dict."""
    rng = np.random.default_rng(seed)
    policy = _policy()
    history = None
    frames, steps, analyses, verdicts = [], [], [], []
    for i, (step, pct) in enumerate(STEPS):
        start = T0 + timedelta(minutes=7 * i)
        frames.append(_frame(rng, step, pct, start, canary_error, 0.0 if canary_error <= 0.02 else 3.0))
        verdict = judge(pd.concat(frames), policy, history, is_last_step=(i == len(STEPS) - 1))
        history = verdict.history
        verdicts.append(verdict)
        look_at = (start + timedelta(minutes=6)).isoformat() + "Z"
        steps.append({"step_index": step, "percent": pct, "step_started_at": start.isoformat() + "Z"})
        analyses.append({"verdict": verdict.to_dict(), "record": verdict.to_text(), "look_at": look_at})
        if verdict.decision == "rollback":
            break
    last = verdicts[-1]
    outcome = {"promote": "promoted", "rollback": "rolled_back"}.get(last.decision, "running")
    plan = {"spec": {"model": "fraud", "steps": [10, 50]}, "candidate": "v2", "run_id": "manual__<b>&run"}
    pre = {"stable": "v1", "candidate": "v2", "rollout_started_at": (T0 - timedelta(seconds=30)).isoformat() + "Z",
           "power_plan": {"expected_requests": 6000}}
    run = build_run(plan, pre, steps=steps, analyses=analyses, outcome=outcome, reason=last.reason,
                    final_percent=100.0 if outcome == "promoted" else 0.0,
                    finished_at=(T0 + timedelta(minutes=15)).isoformat() + "Z",
                    root_cause={"text": "error_rate <script>alert(1)</script> worse",
                                "failing_metrics": [{"metric": "error_rate", "canary": 0.2}]}
                    if outcome == "rolled_back" else None,
                    drift={"features": {"amount": {"psi": 0.013, "threshold": 0.1, "drifted": False}}}
                    if outcome == "promoted" else None)
    return run, verdicts


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def test_promoted_run_report(tmp_path):
    run, verdicts = _run(canary_error=0.02)
    assert [v.decision for v in verdicts] == ["advance", "promote"], [v.reason for v in verdicts]
    path = write_report(run, tmp_path)
    assert path.parent == (tmp_path / "fraud").resolve() and path.suffix == ".html"
    html = path.read_text()

    images = _images(html)
    assert len(images) == 3  # traffic share + one per metric
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 2000 for img in images)
    assert "src=\"http" not in html and "src='http" not in html  # self-contained

    # the judge's numbers are in the tables, formatted as the report formats them
    ev = verdicts[-1].metrics[0]
    assert f"{ev.diff:.4g}" in html and f"{ev.canary:.4g}" in html
    assert "non-inferior" in html and "promoted" in html
    assert verdicts[-1].reason in html
    # decision records of both looks, and the drift table after promotion
    assert html.count("DECISION: ADVANCE") == 1 and html.count("DECISION: PROMOTE") == 1
    assert "Drift after promotion" in html and "0.013" in html
    # the run id is escaped, not interpreted
    assert "manual__&lt;b&gt;&amp;run" in html and "<b>&run" not in html


def test_rolled_back_run_report_shows_root_cause_and_boundaries(tmp_path):
    run, verdicts = _run(canary_error=0.20)
    assert verdicts[-1].decision == "rollback", verdicts[-1].reason
    html = render_report(run)
    assert "Root cause of the rollback" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "rolled back" in html and "harm" in html

    points = metric_points(run)["error_rate"]
    ev = verdicts[-1].metrics[0].to_dict()
    # the rollback threshold in metric units is the difference at which the judge's z_harm reaches b_rollback:
    # se times the t value of b_rollback on the judge's degrees of freedom (b_rollback * se only when df is
    # infinite, stored as null; a look with few clusters has a finite df and its threshold is further out)
    threshold = points[-1].rollback_bound
    if ev["df"] is None:
        assert threshold == pytest.approx(ev["b_rollback"] * ev["se"])
    else:
        assert t_to_z(threshold / ev["se"], ev["df"]) == pytest.approx(ev["b_rollback"])
        assert threshold > ev["b_rollback"] * ev["se"]
    assert points[-1].difference == pytest.approx(ev["diff"]) and points[-1].difference > threshold
    assert points[-1].noninferiority_bound == pytest.approx(0.01)
    assert points[-1].low == pytest.approx(ev["interval"][0])

    series = traffic_series(run)
    assert series[0][1] == 0.0 and max(p for _, p in series) == 10.0 and series[-1][1] == 0.0


def test_report_of_a_run_that_failed_before_any_step(tmp_path):
    run = build_run({"spec": {"model": "fraud"}, "candidate": "v9", "run_id": "r1"}, None, outcome="failed",
                    reason="candidate v9 is not registered")
    html = write_report(run, tmp_path).read_text()
    assert "No traffic step was taken" in html and "candidate v9 is not registered" in html
    assert _images(html) == []


def test_unsafe_names_cannot_escape_the_reports_folder(tmp_path):
    run = build_run({"spec": {"model": "../../etc"}, "run_id": "../x/y"}, None, outcome="failed", reason="x")
    path = write_report(run, tmp_path / "reports")
    assert (tmp_path / "reports").resolve() in path.parents


def test_bad_input_is_named():
    with pytest.raises(ReportError, match="outcome must be one of"):
        build_run({}, None, outcome="won")
    with pytest.raises(ReportError, match="run must be a dict"):
        render_report([])  # type: ignore[arg-type]
