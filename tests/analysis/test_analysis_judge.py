"""The judge end to end on per-request DataFrames (Contract 3): decisions, gates, history, record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from canary.analysis import LookHistory, MetricPolicy, Policy, Verdict, judge
from canary.analysis.stats import ArmStats

T0 = pd.Timestamp("2026-03-01 10:00:00")


def rollout(rates: dict[str, float], steps=(10.0, 50.0), n_per_step=40000, seed=1, lat_scale=1.0,
            share_bias=1.0) -> pd.DataFrame:
    """Per-request rows over ``steps`` (30 minutes each); error rate per arm, latency lognormal."""
    rng = np.random.default_rng(seed)
    frames = []
    for k, pct in enumerate(steps):
        n = n_per_step
        arm = np.where(rng.random(n) < pct / 100 * share_bias, "canary", "stable")
        ts = T0 + pd.Timedelta(minutes=30 * k) + pd.to_timedelta(rng.uniform(0, 1800, n), unit="s")
        err = (rng.random(n) < np.where(arm == "canary", rates["canary"], rates["stable"])).astype(float)
        lat = rng.lognormal(3, 0.5, n) * np.where(arm == "canary", lat_scale, 1.0)
        frames.append(pd.DataFrame({"arm": arm, "step": k, "ts": ts, "percent": pct, "error_rate": err,
                                    "latency_ms": lat, "unit_id": None}))
    return pd.concat(frames, ignore_index=True)


POLICY = Policy(
    metrics=(MetricPolicy("error_rate", "error", critical=True, margin=0.2, margin_type="relative"),
             MetricPolicy("latency_ms", "latency_ms", kind="latency_threshold", threshold=40.0, margin=0.02)),
    planned_canary_samples=24000, circuit_breaker_alpha=0.001)


def looks(df: pd.DataFrame, policy=POLICY) -> list[Verdict]:
    out, hist = [], None
    steps = sorted(df.step.unique())
    for k in steps:
        v = judge(df[df.step <= k], policy, hist, is_last_step=k == steps[-1])
        out.append(v)
        hist = json.loads(json.dumps(v.history.to_dict()))  # through XCom
        if v.decision in ("rollback", "promote"):
            break
    return out


def test_equal_arms_advance_then_promote():
    vs = looks(rollout({"stable": 0.02, "canary": 0.02}))
    assert [v.decision for v in vs] == ["advance", "promote"]
    last = vs[-1]
    assert all(m.non_inferior and not m.harm for m in last.metrics)
    assert last.metrics[0].information == pytest.approx(min(1.0, last.metrics[0].samples["canary"] / 24000))
    assert vs[0].metrics[0].information == pytest.approx(vs[0].metrics[0].samples["canary"] / 24000)
    assert last.history.looks[0]["metrics"]["error_rate"]["t"] == vs[0].metrics[0].information


def test_harm_rolls_back_with_the_metric_named():
    vs = looks(rollout({"stable": 0.02, "canary": 0.03}))
    v = vs[-1]
    assert v.decision == "rollback"
    assert "error_rate" in v.reason
    m = v.metrics[0]
    assert m.harm or (m.breaker and m.breaker["tripped"])
    assert m.canary > m.stable and m.z_harm > 3


def test_latency_regression_rolls_back_on_the_exceedance_metric():
    v = looks(rollout({"stable": 0.02, "canary": 0.02}, lat_scale=1.3))[-1]
    assert v.decision == "rollback" and "latency_ms" in v.reason and "error_rate" not in v.reason


def test_sample_ratio_mismatch_blocks_promotion():
    df = rollout({"stable": 0.02, "canary": 0.02}, share_bias=1.1)
    v = judge(df, POLICY, None, is_last_step=True)
    assert v.srm["mismatch"] and v.decision == "extend" and "sample ratio mismatch" in v.reason


def test_data_quality_failure_rolls_back_and_drift_blocks():
    df = rollout({"stable": 0.02, "canary": 0.02})
    dq = {"success": False, "failures": [{"expectation": "expect_column_values_to_be_between",
                                          "column": "score", "observed": "3% unexpected"}]}
    v = judge(df, POLICY, None, is_last_step=True, data_quality=dq)
    assert v.decision == "rollback" and "expect_column_values_to_be_between" in v.reason and "3%" in v.reason
    v = judge(df, POLICY, None, is_last_step=False, drift={"drifted": ["amount"]})
    assert v.decision == "extend" and "amount" in v.reason


def test_too_little_data_extends_and_spends_no_alpha():
    df = rollout({"stable": 0.02, "canary": 0.02}, n_per_step=200, steps=(5.0,))
    v = judge(df, POLICY, None)
    assert v.decision == "extend" and "not testable" in v.reason
    assert v.history.looks[0]["metrics"]["error_rate"]["t"] is None


def test_same_input_same_verdict_and_json_round_trip():
    df = rollout({"stable": 0.02, "canary": 0.025}, seed=3)
    a = judge(df, POLICY, {"looks": []}).to_dict()
    b = judge(ArmStats.from_frame(df, POLICY), POLICY, LookHistory()).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.loads(json.dumps(a))["decision"] in ("advance", "promote", "rollback", "extend")


def test_decision_record_is_a_readable_table():
    v = looks(rollout({"stable": 0.02, "canary": 0.03}))[-1]
    text = v.to_text()
    assert text.startswith("DECISION: ROLLBACK")
    assert "error_rate*" in text and "latency_ms" in text and "rollback@" in text
    assert f"{v.metrics[0].samples['stable']}/{v.metrics[0].samples['canary']}" in text
    assert "sample ratio: p =" in text and "next: canary to 0 %" in text


def test_missing_column_is_named():
    df = rollout({"stable": 0.02, "canary": 0.02}).drop(columns=["latency_ms"])
    with pytest.raises(ValueError, match="latency_ms"):
        judge(df, POLICY)


ZERO_ERRORS = Policy(
    metrics=(MetricPolicy("error_rate", "error", critical=True, margin=0.002, margin_type="absolute"),),
    planned_canary_samples=6000, circuit_breaker_alpha=0.001)


def test_a_canary_that_makes_no_errors_can_be_promoted():
    # Neither arm makes an error: the critical error-rate metric has no variation. It must still be tested
    # (0 errors in thousands of requests bounds the rate well below a 0.2 % margin), not block promotion.
    df = rollout({"stable": 0.0, "canary": 0.0}, steps=(50.0,), n_per_step=12000)
    v = judge(df, ZERO_ERRORS, None, is_last_step=True)
    ev = v.metrics[0]
    assert ev.tested and ev.se > 0 and ev.non_inferior and not ev.harm
    assert v.decision == "promote", v.reason


def test_zero_errors_in_few_requests_is_not_enough_to_promote():
    # 0 errors in ~60 requests per arm: the exact upper bound (about 3/60 = 5 %) is far above the margin.
    df = rollout({"stable": 0.0, "canary": 0.0}, steps=(50.0,), n_per_step=120)
    v = judge(df, ZERO_ERRORS.__class__(**{**ZERO_ERRORS.__dict__, "min_samples": 10}), None, is_last_step=True)
    ev = v.metrics[0]
    assert ev.tested and not ev.non_inferior
    assert v.decision == "extend", v.reason


def test_errors_only_in_the_canary_are_harm_even_when_stable_has_none():
    df = rollout({"stable": 0.0, "canary": 0.01}, steps=(50.0,), n_per_step=12000)
    v = judge(df, ZERO_ERRORS, None, is_last_step=True)
    assert v.decision == "rollback", v.reason


def test_the_final_look_spends_the_remaining_alpha():
    # Traffic ran slower than planned: the cap comes at a small information fraction, where the
    # O'Brien-Fleming-type promotion boundary is out of reach. The final look is at t = 1 by definition.
    planned_far = Policy(metrics=POLICY.metrics, planned_canary_samples=400_000, circuit_breaker_alpha=0.001)
    df = rollout({"stable": 0.02, "canary": 0.02}, steps=(50.0,))
    ordinary = judge(df, planned_far, None, is_last_step=True)
    final = judge(df, planned_far, None, is_last_step=True, final_look=True)
    assert ordinary.decision == "extend", ordinary.reason
    assert final.decision == "promote", final.reason
    assert final.metrics[0].information == 1.0 and final.metrics[0].b_promotion < ordinary.metrics[0].b_promotion
    # Not on an earlier step: its cap is not the rollout's last look, the alpha stays for later steps.
    assert judge(df, planned_far, None, is_last_step=False, final_look=True).metrics[0].information < 1.0


def test_the_final_look_still_rolls_back_harm():
    planned_far = Policy(metrics=POLICY.metrics, planned_canary_samples=400_000, circuit_breaker_alpha=0.001)
    df = rollout({"stable": 0.02, "canary": 0.03}, steps=(50.0,))
    assert judge(df, planned_far, None, is_last_step=True, final_look=True).decision == "rollback"


def test_advance_names_estimates_beyond_their_margin_that_are_not_yet_significant():
    """'No harm shown' is true at a small first step, but a reader must see an estimate already beyond its
    margin (the next step looks again with more data)."""
    policy = Policy(metrics=(MetricPolicy("error_rate", "error", critical=True, margin=0.002),),
                    planned_canary_samples=200_000, circuit_breaker_enabled=False)
    df = rollout({"stable": 0.02, "canary": 0.025}, steps=(1.0, 50.0), n_per_step=20000, seed=5)
    v = judge(df[df.step == 0], policy, None, is_last_step=False)  # ~200 canary requests: not significant
    ev = v.metrics[0]
    assert v.decision == "advance" and not ev.harm and ev.diff > ev.margin, (v.reason, ev.diff)
    assert v.reason.startswith("no harm shown on any metric; gates hold; beyond the margin at this look but "
                               "not yet significant: error_rate (canary - stable 0.005611, margin 0.002)"), v.reason
    better = judge(rollout({"stable": 0.02, "canary": 0.025}, steps=(1.0, 50.0), n_per_step=20000,
                           seed=8).query("step == 0"), policy)
    assert better.metrics[0].diff < 0 and better.reason == "no harm shown on any metric; gates hold", better.reason


def test_interval_uses_the_t_value_so_it_agrees_with_the_non_inferiority_test():
    """With few clusters (few degrees of freedom) the interval is diff +- t * se, t the t value of the
    promotion boundary: its harm-side end is inside an absolute margin exactly when the test passes."""
    from canary.analysis.stats import z_to_t

    pol = Policy(metrics=(MetricPolicy("latency_ms", "latency_ms", kind="continuous", margin=4.0),),
                 planned_canary_samples=2000, min_clusters=3, cluster_seconds=600)
    df = rollout({"stable": 0.02, "canary": 0.02}, steps=(50.0,), n_per_step=4000, seed=3)
    v = judge(df, pol, None, is_last_step=True)
    ev = v.metrics[0]
    assert ev.tested and 2 <= ev.df < 30  # three 10-minute clusters per arm
    t = z_to_t(ev.b_promotion, ev.df)
    assert t > ev.b_promotion * 1.05
    assert ev.interval == pytest.approx((ev.diff - t * ev.se, ev.diff + t * ev.se))
    for margin in np.linspace(0.2, 8.0, 40):  # the same look judged against many margins
        p = Policy(metrics=(MetricPolicy("latency_ms", "latency_ms", kind="continuous", margin=float(margin)),),
                   planned_canary_samples=2000, min_clusters=3, cluster_seconds=600)
        e = judge(df, p, None, is_last_step=True).metrics[0]
        assert e.non_inferior == (e.interval[1] < margin)


def test_an_extend_after_the_plans_final_analysis_is_final():
    """On the last step, once a metric has spent all its promotion alpha (information past the plan)
    without being shown non-inferior, later looks have an infinite boundary for it: the verdict says the
    extend is final, so the caller applies on_inconclusive instead of holding the share until the cap."""
    tight = Policy(metrics=(MetricPolicy("error_rate", "error", critical=True, margin=0.01, margin_type="relative"),),
                   planned_canary_samples=2000, circuit_breaker_alpha=0.001)
    df = rollout({"stable": 0.02, "canary": 0.02}, steps=(50.0,))
    first = judge(df[df.ts < T0 + pd.Timedelta(minutes=20)], tight, None, is_last_step=True)
    assert first.decision == "extend" and first.metrics[0].information == 1.0 and first.final
    assert "no later look can promote" in first.reason and first.to_dict()["final"] is True
    later = judge(df, tight, first.history, is_last_step=True)
    assert later.decision == "extend" and later.metrics[0].b_promotion == float("inf")  # why it is final
    # before the plan's information is reached the extend is an ordinary one
    far = Policy(metrics=tight.metrics, planned_canary_samples=400_000, circuit_breaker_alpha=0.001)
    assert not judge(df, far, None, is_last_step=True).final
    # and an earlier step never ends this way (its alpha is kept for the later steps)
    assert not judge(df, tight, None, is_last_step=False).final


def test_an_advance_names_the_metrics_it_could_not_test():
    """A step advances on its tested metrics; one the look could not test (here: no values logged yet) is
    named, so "no harm shown" is not read as covering it."""
    pol = Policy(metrics=(*POLICY.metrics, MetricPolicy("score", "score", kind="continuous", margin=0.1)),
                 planned_canary_samples=24000, circuit_breaker_alpha=0.001)
    df = rollout({"stable": 0.02, "canary": 0.02}, steps=(10.0, 50.0))
    df["score"] = np.nan
    v = judge(df[df.step == 0], pol, None, is_last_step=False)
    assert v.decision == "advance", v.reason
    assert "no harm shown on any tested metric" in v.reason and "not tested at this look: score (" in v.reason
    full = judge(df[df.step == 0], POLICY, None, is_last_step=False)
    assert full.decision == "advance" and "not tested" not in full.reason, full.reason
