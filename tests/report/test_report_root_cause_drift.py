"""The root cause lists as "drifting" only features whose drift test flagged them; when none did, the
nearest ones appear under their own title, in the runtime's text and in the HTML report. Drift results come
from ``canary.analysis.drift.compare_arms`` on generated rows (no hand-written drift dicts)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from canary import runtime
from canary.analysis import drift
from canary.report import build_run, render_report


def _arms(shift: float, n: int = 4000, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    arm = np.where(rng.random(n) < 0.5, "canary", "stable")
    canary = arm == "canary"
    return pd.DataFrame({
        "arm": arm,
        "amount": rng.lognormal(3.0, 1.0, n) * np.where(canary, 1.0 + shift, 1.0),
        "hour": rng.integers(0, 24, n).astype(float),
        "merchant_risk": rng.random(n),
        "country": rng.choice(["de", "fr", "it"], n),
    })


def _verdict(frame: pd.DataFrame) -> dict:
    return {"decision": "extend", "reason": "input drift between arms", "metrics": [],
            "drift": drift.compare_arms(frame, None, ["amount", "hour", "merchant_risk", "country"])}


def _section(html: str) -> str:
    return html[html.index("Root cause of the rollback"):]


def test_no_feature_drifted_lists_the_closest_under_their_own_title():
    v = _verdict(_arms(shift=0.0))
    assert v["drift"]["drifted"] == [] and len(v["drift"]["columns"]) == 4
    rc = runtime.root_cause(v)
    assert rc["top_drifting_features"] == []
    assert [d["drifted"] for d in rc["closest_to_drifting"]] == [False] * 4
    ratios = [(d.get("psi") or d.get("js")) / d["threshold"] for d in rc["closest_to_drifting"]]
    assert ratios == sorted(ratios, reverse=True)  # nearest first
    text = runtime.root_cause_text(rc)
    assert "drifting feature:" not in text and "no feature drifted; closest: " in text
    html = _section(render_report(build_run({"spec": {"model": "fraud"}}, None, outcome="rolled_back",
                                            reason="x", root_cause=rc)))
    assert "closest to drifting (none drifted)" in html and "top drifting features" not in html


def test_drifted_features_only_are_listed_as_drifting():
    v = _verdict(_arms(shift=1.0))
    assert v["drift"]["drifted"] == ["amount"]
    rc = runtime.root_cause(v)
    assert [d["feature"] for d in rc["top_drifting_features"]] == ["amount"]
    assert rc["closest_to_drifting"] == []
    text = runtime.root_cause_text(rc)
    assert re.search(r"drifting feature: amount PSI [0-9.]+ vs threshold 0\.1\b", text)
    assert "hour" not in text and "closest" not in text
    html = _section(render_report(build_run({"spec": {"model": "fraud"}}, None, outcome="rolled_back",
                                            reason="x", root_cause=rc)))
    assert "top drifting features" in html and "closest to drifting" not in html
    assert ">amount<" in html and ">hour<" not in html


def test_report_of_an_older_root_cause_with_undrifted_features_under_drifting():
    # A root cause XCom written before the split: every entry drifted False, under "top_drifting_features".
    rc = runtime.root_cause(_verdict(_arms(shift=0.0)))
    old = {**rc, "top_drifting_features": rc["closest_to_drifting"]}
    del old["closest_to_drifting"]
    html = _section(render_report(build_run({"spec": {"model": "fraud"}}, None, outcome="rolled_back",
                                            reason="x", root_cause=old)))
    assert "closest to drifting (none drifted)" in html and "top drifting features" not in html


def test_report_shows_preflight_power_warnings():
    spec = runtime.validate("include/rollouts/fraud.yaml", {"candidate": "v2"}, None, "manual", "t")["spec"]
    spec["hold"] = {**spec["hold"], "max_wait": 600.0}
    rates = {"error_rate": 0.01, "latency_p95_exceed": 0.05, "mistake_rate": 0.08}
    baseline = {"rate_per_s": 30.0, "labelled_share": 0.5, "sampled": 5000, "base_rates": rates,
                "variances": {k: p * (1 - p) for k, p in rates.items()}}
    pp = runtime.power_plan(spec, baseline)
    pp["power_warnings"] = runtime.power_warnings(spec, baseline, pp)
    assert pp["power_warnings"]
    pre = {"model": "fraud", "stable": "v1", "candidate": "v2", "power_plan": pp,
           "power_warnings": pp["power_warnings"]}
    html = render_report(build_run({"spec": spec}, pre, outcome="rolled_back", reason="inconclusive at the cap"))
    top = html[:html.index("Traffic share over time")]
    assert "Pre-flight warnings" in top
    for w in pp["power_warnings"]:
        assert f"metric {w['metric']}: the promotion test needs ~{w['samples_needed']}" in top
