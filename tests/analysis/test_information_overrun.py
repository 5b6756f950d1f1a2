"""Information past the plan: the traffic ran faster than the power plan assumed, so the canary's samples pass
the planned maximum before the last step. The level must hold and later steps must still be able to roll
back (before this, every look after the overrun had an infinite boundary)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from canary.analysis import MetricPolicy, Policy, judge
from canary.analysis.boundaries import boundaries, crossing_probability, spending

T0 = pd.Timestamp("2026-03-01 10:00:00")


@pytest.mark.parametrize("kind", ["pocock", "obrien_fleming"])
def test_boundaries_with_times_past_one_spend_exactly_the_fractions(kind):
    times = [0.4, 1.2, 2.0, 2.8]  # actual information over the plan
    fractions = [0.4, 0.7, 0.85, 1.0]  # what is spent: below 1 until the final look
    b = boundaries(fractions, 0.05, kind, times=times)
    assert all(math.isfinite(x) for x in b), b
    for k in range(1, len(b) + 1):  # the null crossing probability by look k is the spending at look k
        assert crossing_probability(b[:k], times[:k]) == pytest.approx(spending(fractions[k - 1], 0.05, kind),
                                                                         abs=3e-4)


def test_boundaries_with_times_hold_the_level_by_simulation():
    """Monte Carlo of the Brownian motion at the actual times: the one-sided level is 0.025."""
    times = np.array([0.3, 1.1, 1.9, 3.0])
    fractions = [0.3, 0.65, 0.825, 1.0]
    b = np.array(boundaries(fractions, 0.025, "pocock", times=times))
    rng = np.random.default_rng(7)
    steps = rng.normal(size=(400_000, len(times))) * np.sqrt(np.diff(np.r_[0.0, times]))
    z = np.cumsum(steps, axis=1) / np.sqrt(times)
    rate = float((z >= b).any(axis=1).mean())
    assert rate == pytest.approx(0.025, abs=0.0015), (rate, b)


def test_nearby_looks_are_not_rounded_into_one():
    b = boundaries([0.3412, 0.3414, 0.3416], 0.05, "pocock")
    assert all(math.isfinite(x) for x in b), b
    assert b[1] > b[0]  # a look that adds almost no information spends almost nothing


def _rollout(canary_rate_by_step, steps=(1.0, 5.0, 25.0, 50.0), n_per_step=40_000, seed=3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for k, pct in enumerate(steps):
        arm = np.where(rng.random(n_per_step) < pct / 100, "canary", "stable")
        ts = T0 + pd.Timedelta(minutes=30 * k) + pd.to_timedelta(rng.uniform(0, 1800, n_per_step), unit="s")
        p = np.where(arm == "canary", canary_rate_by_step[k], 0.02)
        frames.append(pd.DataFrame({"arm": arm, "step": k, "ts": ts, "percent": pct,
                                    "error_rate": (rng.random(n_per_step) < p).astype(float),
                                    "latency_ms": rng.lognormal(3, 0.5, n_per_step), "unit_id": None}))
    return pd.concat(frames, ignore_index=True)


def test_harm_that_appears_after_the_plan_was_passed_is_still_rolled_back():
    """The plan expected 1,500 canary samples in all; the canary has ~2,400 after step 2. Its error rate
    doubles from step 3 on: the judge must still roll back (the circuit breaker is off here, so only the
    group-sequential test can do it)."""
    policy = Policy(metrics=(MetricPolicy("error_rate", "error", margin=0.2, margin_type="relative"),),
                    planned_canary_samples=1500, circuit_breaker_enabled=False)
    df = _rollout([0.02, 0.02, 0.04, 0.04])
    hist, verdicts = None, []
    for k in range(4):
        v = judge(df[df.step <= k], policy, hist, is_last_step=k == 3)
        verdicts.append(v)
        hist = json.loads(json.dumps(v.history.to_dict()))
        if v.decision in ("rollback", "promote"):
            break
    assert [v.decision for v in verdicts] == ["advance", "advance", "rollback"], [v.reason for v in verdicts]
    ev = verdicts[-1].metrics[0]
    assert ev.harm and math.isfinite(ev.b_rollback)
    fractions = [look["metrics"]["error_rate"]["t"] for look in verdicts[-1].history.looks]
    times = [look["metrics"]["error_rate"]["u"] for look in verdicts[-1].history.looks]
    assert fractions[1] < 1.0 and fractions[2] < 1.0 and fractions == sorted(fractions)  # alpha left for later
    assert times[2] > 1.0  # the data ran past the plan


def test_an_old_history_without_times_still_reads():
    """Histories written before ``u`` existed (a run upgraded mid-way) use ``t`` as the time."""
    policy = Policy(metrics=(MetricPolicy("error_rate", "error", margin=0.2, margin_type="relative"),),
                    planned_canary_samples=30_000, circuit_breaker_enabled=False)
    df = _rollout([0.02, 0.02, 0.02, 0.02])
    first = judge(df[df.step <= 1], policy, None).history.to_dict()
    for look in first["looks"]:
        look["metrics"]["error_rate"].pop("u")
    again = judge(df[df.step <= 2], policy, first)
    assert again.metrics[0].tested and math.isfinite(again.metrics[0].b_rollback)
