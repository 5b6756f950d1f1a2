"""Drift statistics against hand computations and scipy; data quality failures named with observed values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from canary.analysis.drift import compare_arms, compare_column, js_divergence, psi, psi_threshold
from canary.analysis.quality import load_suite, validate
from scipy import stats
from scipy.spatial.distance import jensenshannon


def test_psi_by_hand():
    ref = np.arange(100, dtype=float)  # quartile edges 24.75, 49.5, 74.25: 25 per bin
    cur = np.r_[np.full(10, 10.0), np.full(40, 60.0)]  # 10 in bin 0, 40 in bin 2
    value, used = psi(ref, cur, bins=4)
    p = np.array([25.5, 25.5, 25.5, 25.5]) / 102
    q = np.array([10.5, 0.5, 40.5, 0.5]) / 52
    assert used == 4
    assert value == pytest.approx(np.sum((q - p) * np.log(q / p)))


def test_psi_threshold_is_calibrated_under_no_drift():
    assert psi_threshold(1000, 500, 10, 0.0) == pytest.approx((1 / 1000 + 1 / 500) * stats.chi2.ppf(0.999, 9))
    assert psi_threshold(10**6, 10**6, 10, 0.1) == 0.1
    rng = np.random.default_rng(2)
    flags = [compare_column(rng.normal(size=400), rng.normal(size=300), 10, 0.0)["drifted"] for _ in range(400)]
    assert np.mean(flags) <= 0.01  # nominal 0.001; a small sample of the null
    shifted = compare_column(rng.normal(size=5000), rng.normal(0.5, 1, 5000))
    assert shifted["drifted"]


def test_js_and_ks_match_scipy():
    r = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    c = ["a"] * 30 + ["b"] * 30 + ["c"] * 30 + [None] * 10
    value, k = js_divergence(r, c)
    p = np.array([50, 30, 20, 0]) / 100  # categories sorted: <null>, a, b, c -> reorder below
    q = np.array([30, 30, 30, 10]) / 100
    assert k == 4
    assert value == pytest.approx(jensenshannon(p, q) ** 2)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=300), rng.normal(0.5, 1, 200)
    res = compare_column(a, b)
    ks = stats.ks_2samp(a, b)
    assert res["ks"] == pytest.approx(ks.statistic) and res["ks_p_value"] == pytest.approx(ks.pvalue)


def test_compare_arms_flags_biased_routing_on_inputs_only():
    rng = np.random.default_rng(8)
    n = 4000
    arm = np.where(rng.random(n) < 0.5, "canary", "stable")
    amount = np.where(arm == "canary", rng.lognormal(4.5, 1, n), rng.lognormal(4, 1, n))
    score = np.where(arm == "canary", rng.random(n) * 0.5, rng.random(n))
    country = rng.choice(["de", "fr"], n)
    rows = pd.DataFrame({"arm": arm, "amount": amount, "country": country, "score": score, "ts": 0})
    res = compare_arms(rows)
    assert res["drifted"] == ["amount"]
    two = compare_arms(rows[rows.arm == "stable"], rows[rows.arm == "canary"], ["amount", "country"])
    assert two["drifted"] == ["amount"] and set(two["columns"]) == {"amount", "country"}
    assert res["columns"]["score"]["drifted"]  # reported, but outputs may differ between models
    assert not res["columns"]["country"]["drifted"]
    with pytest.raises(ValueError, match="nope"):
        compare_arms(rows, columns=["nope"])


def test_a_feature_only_one_arm_logs_is_named_not_compared():
    """A feature only the candidate's callers send has no values on stable: it cannot be compared, and the
    record must say so rather than "input drift between arms: none"."""
    from canary.analysis.record import verdict_text

    rng = np.random.default_rng(3)
    n = 1000
    arm = np.where(rng.random(n) < 0.5, "canary", "stable")
    rows = pd.DataFrame({"arm": arm, "amount": rng.lognormal(4, 1, n),
                         "dist": np.where(arm == "canary", rng.random(n), np.nan)})
    res = compare_arms(rows)
    assert res["drifted"] == [] and list(res["not_compared"]) == ["dist"]
    assert res["not_compared"]["dist"].startswith("too few values: 0 reference / ")
    text = verdict_text({"decision": "advance", "reason": "r", "metrics": [], "drift": res})
    assert "input drift between arms: none; not compared (stable = reference, canary = current): dist (too few" \
        in text
    assert compare_arms(rows[["arm", "amount"]])["not_compared"] == {}


def _fraud_rows(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "prediction": rng.integers(0, 2, n).astype(float), "score": rng.random(n) * 0.4,
        "latency_ms": rng.lognormal(3, 0.5, n), "status": "ok", "amount": rng.lognormal(3, 1, n),
        "hour": rng.integers(0, 24, n).astype(float), "account_age_days": 30.0, "tx_last_24h": 1.0,
        "merchant_risk": rng.random(n), "country": rng.integers(0, 5, n).astype(float), "distance_km": 2.0})


def test_quality_passes_clean_rows_and_names_failures_with_observed_values():
    rows = _fraud_rows()
    ok = validate(rows, "fraud")
    assert ok["success"] and ok["failures"] == [] and ok["evaluated"] == len(load_suite("fraud")["expectations"])
    bad = rows.copy()
    bad.loc[:49, "score"] = 1.5  # 2.5 % of scores out of range
    bad.loc[:9, "prediction"] = 7.0
    bad = bad.drop(columns=["merchant_risk"])
    err = bad.iloc[:5].assign(status="error", score=np.nan)  # error rows are not the suite's business
    res = validate(pd.concat([bad, err]), "fraud")
    assert not res["success"] and res["rows"] == 2000
    by = {(f["expectation"], f["column"]): f for f in res["failures"]}
    assert "2.5% unexpected (50 rows)" in by[("expect_column_values_to_be_between", "score")]["observed"]
    assert "1.5" in by[("expect_column_values_to_be_between", "score")]["observed"]
    assert "(10 rows)" in by[("expect_column_values_to_be_in_set", "prediction")]["observed"]
    assert by[("expect_column_to_exist", "merchant_risk")]["observed"] == "column missing"
    mean = by.get(("expect_column_mean_to_be_between", "score"))
    assert mean is None or isinstance(mean["observed"], float)


def test_suite_names_are_validated():
    with pytest.raises(ValueError, match="not a valid suite name"):
        load_suite("../etc/passwd")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_suite("no_such_model")
    assert load_suite("eta")["name"] == "eta"


def _suite_file(tmp_path, name, change):
    suite = load_suite("fraud")
    suite["name"] = name
    change(suite["expectations"])
    (tmp_path / f"{name}.json").write_text(json.dumps(suite))


def test_suite_with_an_unknown_type_or_bad_kwargs_is_refused_with_the_fix(tmp_path):
    def typo(exps):
        exps[12]["type"] = "expect_column_value_to_be_between"  # GX would log and drop it: 19 of 20 checks
        exps[13]["kwargs"].pop("column")
        exps[14]["kwargs"]["min_vlaue"] = exps[14]["kwargs"].pop("min_value")
    _suite_file(tmp_path, "typo", typo)
    with pytest.raises(ValueError) as info:
        load_suite("typo", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "typo.json") in message and "3 invalid expectation(s)" in message
    assert ("expectations[12]: unknown expectation type 'expect_column_value_to_be_between'; did you mean "
            "'expect_column_values_to_be_between'? fix the type in the suite file") in message
    assert "expectations[13] (expect_column_values_to_be_in_set)" in message and "column: field required" in message
    assert "min_vlaue: extra fields not permitted" in message
    with pytest.raises(ValueError, match="unknown expectation type"):  # a suite given as a dict is checked too
        validate(_fraud_rows(10), json.loads((tmp_path / "typo.json").read_text()))
    assert load_suite("typo", tmp_path, check=False)["name"] == "typo"  # the plain read stays available


def test_an_expectation_that_errors_is_a_failure_and_stays_in_the_count(tmp_path):
    def erroring(exps):
        exps.append({"type": "expect_column_values_to_match_regex", "kwargs": {"column": "hour", "regex": "[0-"}})
        exps.append({"type": "expect_column_mean_to_be_between", "kwargs": {"column": "size_sqft", "min_value": 0}})
    _suite_file(tmp_path, "erroring", erroring)
    res = validate(_fraud_rows(), "erroring", directory=tmp_path)
    assert res["evaluated"] == len(load_suite("erroring", tmp_path)["expectations"]) == 22
    assert not res["success"] and len(res["failures"]) == 2
    by = {f["expectation"]: f for f in res["failures"]}
    assert by["expect_column_values_to_match_regex"]["observed"].startswith("error: ")
    assert by["expect_column_mean_to_be_between"]["column"] == "size_sqft"
    assert "size_sqft" in by["expect_column_mean_to_be_between"]["observed"]
