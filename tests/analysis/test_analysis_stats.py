"""Each statistic against scipy, a hand computation or published group-sequential constants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from canary.analysis import MetricPolicy
from canary.analysis.boundaries import boundaries, constant_boundary, crossing_probability, spending
from canary.analysis.gates import (
    circuit_breaker,
    circuit_breaker_counts,
    labelled_share_test,
    msprt_log_lr,
    srm_test,
)
from canary.analysis.planning import plan_canary_samples
from canary.analysis.stats import MetricCells, compare, t_to_z
from scipy import stats

# Jennison & Turnbull (2000), Table 2.1 (Pocock C_P) and Table 2.3 (O'Brien-Fleming C_B), two-sided
# alpha = 0.05, K equally spaced looks; one-sided 0.025 upper boundaries are the same to 3 decimals.
POCOCK = {2: 2.178, 3: 2.289, 4: 2.361, 5: 2.413}
OBRIEN_FLEMING = {2: 1.977, 3: 2.004, 4: 2.024, 5: 2.040}
# Lan-DeMets spending boundaries, K = 5 equal looks, two-sided 0.05 (DeMets & Lan 1994, Stat Med 13:1341,
# Table I; also gsDesign sfLDOF / sfLDPocock).
LD_OBF_5 = [4.877, 3.357, 2.680, 2.290, 2.031]
LD_POCOCK_5 = [2.438, 2.427, 2.410, 2.397, 2.386]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_classical_constants_match_jennison_turnbull(k):
    assert constant_boundary(k, 0.025, "pocock") == pytest.approx(POCOCK[k], abs=1.5e-3)
    assert constant_boundary(k, 0.025, "obrien_fleming") == pytest.approx(OBRIEN_FLEMING[k], abs=1.5e-3)


def test_lan_demets_spending_boundaries_match_published():
    fr = [0.2, 0.4, 0.6, 0.8, 1.0]
    np.testing.assert_allclose(boundaries(fr, 0.025, "obrien_fleming"), LD_OBF_5, atol=2e-3)
    np.testing.assert_allclose(boundaries(fr, 0.025, "pocock"), LD_POCOCK_5, atol=2e-3)


def test_spending_functions_by_hand():
    assert spending(1.0, 0.05, "pocock") == pytest.approx(0.05)
    assert spending(0.5, 0.05, "pocock") == pytest.approx(0.05 * math.log(1 + (math.e - 1) * 0.5))
    assert spending(0.25, 0.05, "obrien_fleming") == pytest.approx(2 * stats.norm.sf(stats.norm.isf(0.025) / 0.5))
    assert spending(0.3, 0.05, "hsd", -2) == pytest.approx(0.05 * (1 - math.exp(0.6)) / (1 - math.exp(2)))
    assert spending(0.0, 0.05) == 0.0 and spending(2.0, 0.05, "obrien_fleming") == pytest.approx(0.05)


def test_unequal_ramp_boundaries_keep_alpha_by_monte_carlo():
    fr = [0.012, 0.07, 0.38, 1.0]
    b = boundaries(fr, 0.05, "pocock")
    assert crossing_probability(b, fr) == pytest.approx(0.05, abs=2e-4)
    rng = np.random.default_rng(3)
    inc = rng.normal(0, 1, (400_000, 4)) * np.sqrt(np.diff([0.0, *fr]))
    z = np.cumsum(inc, axis=1) / np.sqrt(fr)
    rate = (z >= np.array(b)).any(axis=1).mean()
    assert rate == pytest.approx(0.05, abs=0.0015)  # 4.5 standard errors
    # a drift gives power; crossing_probability agrees with simulation there too
    drift = 2.5
    zd = (np.cumsum(inc, axis=1) + drift * np.array(fr)) / np.sqrt(fr)
    assert crossing_probability(b, fr, drift) == pytest.approx((zd >= np.array(b)).any(axis=1).mean(), abs=0.004)


def test_no_new_information_gives_no_new_alpha():
    b = boundaries([0.5, 0.5], 0.05)
    assert math.isinf(b[1])


def test_t_to_z_matches_scipy():
    for t, df in [(2.0, 5), (3.1, 12.5), (-1.2, 40), (4.0, 3)]:
        assert t_to_z(t, df) == pytest.approx(math.copysign(stats.norm.isf(stats.t.sf(abs(t), df)), t))
    assert t_to_z(1.7, math.inf) == 1.7


def _cells(canary, step, cluster, values):
    import pandas as pd

    d = pd.DataFrame({"c": canary, "s": step, "g": cluster, "x": values})
    a = d.assign(x2=d.x**2).groupby(["c", "s", "g"]).agg(n=("x", "size"), s1=("x", "sum"), s2=("x2", "sum"))
    a = a.reset_index()
    return MetricCells.from_arrays(a.c, a.s, a.g, a.n, a.s1, a.s2)


def test_single_cluster_comparison_is_welch_t():
    rng = np.random.default_rng(1)
    xb, xc = rng.normal(10, 2, 400), rng.normal(10.4, 3, 150)
    c = _cells([False] * 400 + [True] * 150, [0] * 550, [0] * 550, np.r_[xb, xc])
    m = MetricPolicy("lat", "latency_ms", "continuous", "decrease", 0.5, "absolute")
    res = compare(c, m)
    w = stats.ttest_ind(xc, xb, equal_var=False)
    assert res.diff == pytest.approx(xc.mean() - xb.mean())
    assert res.se == pytest.approx(math.sqrt(xb.var(ddof=1) / 400 + xc.var(ddof=1) / 150))
    assert res.df == pytest.approx(w.df)
    assert res.z_harm == pytest.approx(t_to_z(w.statistic, w.df))
    # non-inferiority: canary - stable < 0.5, i.e. the Welch statistic shifted by the margin
    assert res.z_ni == pytest.approx(t_to_z((0.5 - res.diff) / res.se, w.df))
    up = compare(c, MetricPolicy("acc", "label", "continuous", "increase", 0.5, "absolute"))
    assert up.z_harm == pytest.approx(-res.z_harm)


def test_cluster_robust_variance_by_hand():
    # 3 minutes, both arms in each; the minute totals vary more than binomial noise
    n_b, s_b = np.array([100.0, 100, 100]), np.array([5.0, 15, 10])
    n_c = np.array([50.0, 50, 50])

    def residual_share(n, s):  # each minute's residual sum over the arm's count
        return (s - s.sum() / n.sum() * n) / n.sum()

    iid_b, iid_c = 0.1 * 0.9 / 299, 0.1 * 0.9 / 149  # s^2 / N of a 10 % rate
    # the canary's minutes swing against stable's: the paired cluster variance is above the per-request one
    s_c = np.array([9.0, 2, 4])
    c = MetricCells.from_arrays([False] * 3 + [True] * 3, [0] * 6, [1, 2, 3, 1, 2, 3], np.r_[n_b, n_c],
                                np.r_[s_b, s_c], np.r_[s_b, s_c])
    res = compare(c, MetricPolicy("err", "error"))
    paired = 3 / 2 * ((residual_share(n_c, s_c) - residual_share(n_b, s_b)) ** 2).sum()
    assert paired > iid_b + iid_c
    assert res.se == pytest.approx(math.sqrt(paired)) and res.df == pytest.approx(2.0)
    # the same swings in both arms (a load spike hits both) cancel in the difference: the floor, the
    # per-request variance with Welch-Satterthwaite degrees of freedom, is used
    s_c = np.array([2.0, 9, 4])
    c = MetricCells.from_arrays([False] * 3 + [True] * 3, [0] * 6, [1, 2, 3, 1, 2, 3], np.r_[n_b, n_c],
                                np.r_[s_b, s_c], np.r_[s_b, s_c])
    res = compare(c, MetricPolicy("err", "error"))
    paired = 3 / 2 * ((residual_share(n_c, s_c) - residual_share(n_b, s_b)) ** 2).sum()
    per_arm = 3 / 2 * (residual_share(n_c, s_c) ** 2).sum() + 3 / 2 * (residual_share(n_b, s_b) ** 2).sum()
    assert paired < iid_b + iid_c < per_arm  # counting the shared swing once per arm would double it
    assert res.se == pytest.approx(math.sqrt(iid_b + iid_c))
    assert res.df == pytest.approx((iid_b + iid_c) ** 2 / (iid_b**2 / 299 + iid_c**2 / 149))
    # relative margin: the cluster terms of canary - k * stable
    s_c = np.array([9.0, 2, 4])
    c = MetricCells.from_arrays([False] * 3 + [True] * 3, [0] * 6, [1, 2, 3, 1, 2, 3], np.r_[n_b, n_c],
                                np.r_[s_b, s_c], np.r_[s_b, s_c])
    res = compare(c, MetricPolicy("err", "error", margin=0.5, margin_type="relative"))
    k = 1.5
    paired_k = 3 / 2 * ((residual_share(n_c, s_c) - k * residual_share(n_b, s_b)) ** 2).sum()
    assert paired_k > k * k * iid_b + iid_c
    t_ni = (0.1 - k * 0.1) / math.sqrt(paired_k)
    assert res.z_ni == pytest.approx(t_to_z(-t_ni, 2.0))


def test_shared_noise_cancels_and_independent_noise_keeps_its_level():
    """By simulation: per-minute noise common to both arms (load) does not widen the interval of the
    difference, and independent noise keeps the rejection rate at alpha (A/A)."""
    rng = np.random.default_rng(7)
    reps, minutes, alpha = 3000, 30, 0.05
    z = stats.norm.isf(alpha)
    results = {}
    for shared in (True, False):
        se, rej = [], 0
        for _ in range(reps):
            eps_b = rng.normal(0, 0.3, minutes)
            eps_c = eps_b if shared else rng.normal(0, 0.3, minutes)
            nb, nc = np.full(minutes, 2000.0), np.full(minutes, 200.0)
            xb = rng.binomial(2000, 0.05 * np.exp(eps_b - 0.045)).astype(float)
            xc = rng.binomial(200, 0.05 * np.exp(eps_c - 0.045)).astype(float)
            t = np.arange(minutes)
            c = MetricCells.from_arrays(np.r_[np.zeros(minutes, bool), np.ones(minutes, bool)],
                                        np.zeros(2 * minutes), np.r_[t, t], np.r_[nb, nc], np.r_[xb, xc],
                                        np.r_[xb, xc])
            res = compare(c, MetricPolicy("err", "error"))
            se.append(res.se)
            rej += res.z_harm > z
        results[shared] = (float(np.mean(se)), rej / reps)
    binomial = math.sqrt(0.05 * 0.95 * (1 / 60000 + 1 / 6000))
    assert results[True][0] < 1.15 * binomial  # the shared swing cancels: close to the binomial se
    assert results[False][0] > 1.3 * binomial  # independent swings stay in the variance
    assert results[True][1] <= alpha + 0.012 and results[False][1] <= alpha + 0.012


def test_stratified_by_step_removes_ramp_and_drift_bias():
    # step 0: rate 1 %, 10 % canary; step 1: rate 5 %, 50 % canary; no true difference within steps.
    counts = {(0, False): (9000, 90), (0, True): (1000, 10), (1, False): (5000, 250), (1, True): (5000, 250)}
    canary, step, cl, n, s1 = [], [], [], [], []
    for (st, arm), (nn, ss) in counts.items():
        for g in range(10):
            canary.append(arm), step.append(st), cl.append(g), n.append(nn / 10), s1.append(ss / 10)
    c = MetricCells.from_arrays(canary, step, cl, n, s1, s1)
    res = compare(c, MetricPolicy("err", "error"))
    assert res.diff == pytest.approx(0.0, abs=1e-12)
    pooled = (10 + 250) / 6000 - (90 + 250) / 14000
    assert pooled > 0.015  # what an unstratified comparison would have called harm
    w0, w1 = 9000 * 1000 / 10000, 5000 * 5000 / 10000
    assert res.stable_mean == pytest.approx((w0 * 0.01 + w1 * 0.05) / (w0 + w1))


def test_relative_margin_uses_fieller_form():
    rng = np.random.default_rng(5)
    xb, xc = rng.binomial(1, 0.05, 20000), rng.binomial(1, 0.05, 20000)
    c = _cells([False] * 20000 + [True] * 20000, [0] * 40000, [0] * 40000, np.r_[xb, xc].astype(float))
    res = compare(c, MetricPolicy("err", "error", margin=0.1, margin_type="relative"))
    k = 1.1
    vb, vc = xb.var(ddof=1) / 20000, xc.var(ddof=1) / 20000
    t = (xc.mean() - k * xb.mean()) / math.sqrt(vc + k * k * vb)
    assert res.z_ni == pytest.approx(-t, rel=1e-3)
    assert res.margin_abs == pytest.approx(0.1 * xb.mean())


def test_srm_matches_scipy_chisquare():
    traffic = [{"step": 0, "arm": "stable", "requests": 9700, "units": 0, "percent": 5.0},
               {"step": 0, "arm": "canary", "requests": 300, "units": 0, "percent": 5.0},
               {"step": 1, "arm": "stable", "requests": 5100, "units": 4000, "percent": 50.0},
               {"step": 1, "arm": "canary", "requests": 4900, "units": 3900, "percent": 50.0}]
    res = srm_test(traffic, 0.001)
    c0 = stats.chisquare([9700, 300], [9500, 500])
    c1 = stats.chisquare([4000, 3900], [3950, 3950])  # units are counted when logged
    assert res["chi2"] == pytest.approx(c0.statistic + c1.statistic)
    assert res["p_value"] == pytest.approx(stats.chi2.sf(c0.statistic + c1.statistic, 2))
    assert res["mismatch"] and res["steps"][1]["counted"] == "units"
    ok = srm_test(traffic[2:], 0.001)
    assert not ok["mismatch"] and ok["df"] == 1


def test_labelled_share_matches_chi2_contingency():
    lab = {"stable": {"eligible": 5000, "labelled": 3500}, "canary": {"eligible": 1000, "labelled": 640}}
    res = labelled_share_test(lab, 0.001)
    ref = stats.chi2_contingency([[3500, 1500], [640, 360]], correction=False)
    assert res["p_value"] == pytest.approx(ref.pvalue)
    assert res["mismatch"] == (ref.pvalue < 0.001)


def test_msprt_formula_and_breaker():
    d, v, tau = 0.01, 1e-5, 0.02
    want = 0.5 * math.log(v / (v + tau**2)) + tau**2 * d**2 / (2 * v * (v + tau**2))
    assert msprt_log_lr(d, v, tau) == pytest.approx(want)
    assert not circuit_breaker(-0.05, v, tau, 0.001)["tripped"]  # better canary never trips
    assert circuit_breaker(0.05, v, tau, 0.001)["tripped"]
    assert circuit_breaker_counts(10000, 100, 1000, 60, 0.001)["tripped"]  # 1 % -> 6 %
    assert not circuit_breaker_counts(10000, 100, 1000, 12, 0.001)["tripped"]


def test_msprt_is_always_valid_by_simulation():
    # evaluated after every batch of 50 requests per arm for 100 batches, A/A at 5 %: <= alpha
    rng = np.random.default_rng(11)
    reps, alpha = 4000, 0.05
    xb = rng.binomial(50, 0.05, (reps, 100)).cumsum(1)
    xc = rng.binomial(50, 0.05, (reps, 100)).cumsum(1)
    n = 50 * np.arange(1, 101)
    pool = np.clip((xb + xc) / (2 * n), 1e-4, 1)
    var = pool * (1 - pool) * 2 / n
    d = (xc - xb) / n
    llr = 0.5 * np.log(var / (var + 0.05**2)) + 0.05**2 * d**2 / (2 * var * (var + 0.05**2))
    rate = ((llr >= math.log(1 / alpha)) & (d > 0)).any(axis=1).mean()
    assert rate <= alpha


def test_power_plan_by_hand():
    plan = plan_canary_samples(0.05 * 0.95, 0.005, [1, 5, 25, 50], 0.05, 0.8, design_effect=1.0,
                               sequential_inflation=1.0)
    z = stats.norm.isf(0.05) + stats.norm.isf(0.2)
    assert plan.per_step == math.ceil(0.0475 * z * z / (0.005**2 * (0.99 + 0.95 + 0.75 + 0.5)))
    assert plan.total == 4 * plan.per_step
    with pytest.raises(ValueError, match="margin_abs"):
        plan_canary_samples(0.1, 0.0, [50])


def test_labelled_share_is_compared_within_steps():
    # labels keep arriving: step 0 (old) is 90 % labelled, step 1 (young) 50 %, equal in both arms;
    # the canary has most of its rows in step 1, so a pooled test would cry mismatch.
    steps = [{"step": 0, "stable": {"eligible": 9000, "labelled": 8100}, "canary": {"eligible": 1000, "labelled": 900}},
             {"step": 1, "stable": {"eligible": 5000, "labelled": 2500}, "canary": {"eligible": 5000, "labelled": 2500}}]
    tot = {arm: {k: sum(s[arm][k] for s in steps) for k in ("eligible", "labelled")} for arm in ("stable", "canary")}
    pooled = labelled_share_test(tot, 0.001)
    assert pooled["mismatch"]
    strat = labelled_share_test({**tot, "steps": steps}, 0.001)
    assert strat["method"] == "cmh" and strat["p_value"] == pytest.approx(1.0)
    # CMH by hand when the canary really gets fewer labels
    steps[1]["canary"]["labelled"] = 2300
    res = labelled_share_test({**tot, "steps": steps}, 0.001)
    dev = var = 0.0
    for s in steps:
        nb, nc = s["stable"]["eligible"], s["canary"]["eligible"]
        x = s["stable"]["labelled"] + s["canary"]["labelled"]
        n = nb + nc
        dev += s["canary"]["labelled"] - nc * x / n
        var += nb * nc * x * (n - x) / (n * n * (n - 1))
    assert res["p_value"] == pytest.approx(stats.chi2.sf(dev * dev / var, 1))
    assert res["mismatch"]


def test_z_to_t_inverts_t_to_z():
    from canary.analysis.stats import z_to_t

    for t, df in [(2.0, 5), (3.1, 12.5), (-1.2, 40), (4.0, 3)]:
        assert z_to_t(t_to_z(t, df), df) == pytest.approx(t, rel=1e-9)
    assert z_to_t(1.7, None) == 1.7 and z_to_t(1.7, math.inf) == 1.7


def test_an_arm_in_few_clusters_keeps_its_few_degrees_of_freedom():
    """Stable in 60 minutes, a bursty canary in 3 (or 1): the canary's residuals sum to zero over its few
    clusters, so they carry only that many degrees of freedom. Counting stable's 60 would make the variance
    too small (se 3.8 on 59 df here); the paired variance uses the arm with fewer clusters, and an arm in a
    single cluster leaves the step to the per-arm variances."""
    def cells(canary_clusters, shifts):
        can, cl, n, s1, s2 = [], [], [], [], []
        for g in range(60):
            can.append(False), cl.append(g), n.append(50), s1.append(50 * 100.0), s2.append(50 * (100.0**2 + 100))
        for g, sh in zip(canary_clusters, shifts, strict=True):
            mu = 100.0 + sh
            can.append(True), cl.append(g), n.append(20), s1.append(20 * mu), s2.append(20 * (mu * mu + 100))
        return MetricCells.from_arrays(can, [0] * len(can), cl, n, s1, s2)

    m = MetricPolicy("lat", "latency_ms", "continuous", margin=5.0)
    res = compare(cells((5, 30, 55), (8.0, -8.0, 0.0)), m)
    canary_cr = 3 / 2 * (20 * 8.0) ** 2 * 2 / 60**2  # the canary's own CR1 variance of its mean
    assert res.df == pytest.approx(2.0, abs=0.05)
    assert res.se >= math.sqrt(canary_cr)
    one = compare(cells((5,), (8.0,)), m)  # one cluster: its per-request variance must stay in
    assert one.se ** 2 >= 100 / 20 and one.df < 25
