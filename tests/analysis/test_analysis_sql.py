"""The SQL aggregation equals a pandas computation on the same rows, on SQLite and on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from analysis_logdata import T0, load_log, make_log
from canary.analysis import MetricPolicy, Policy
from canary.analysis.sql import arm_counts, baseline, histogram, look_stats, sample_rows
from sqlalchemy import create_engine

WINDOWS = [(0, 10.0, T0, T0 + timedelta(seconds=600)), (1, 40.0, T0 + timedelta(seconds=600),
                                                       T0 + timedelta(seconds=1200))]
LOOK_AT = T0 + timedelta(seconds=1200)
POLICY = Policy(metrics=(
    MetricPolicy("error_rate", "error", critical=True),
    MetricPolicy("slow", "latency_ms", kind="latency_threshold", threshold=30.0),
    MetricPolicy("slow_base", "latency_ms", kind="latency_threshold", threshold="baseline_p95"),
    MetricPolicy("score", "score", kind="continuous"),
    MetricPolicy("no_score", "null_score"),
    MetricPolicy("mistake", "mismatch", label_delay_s=120),
    MetricPolicy("abs_err", "abs_error", kind="continuous"),
))


@pytest.fixture(scope="module")
def log():
    return make_log()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request, log, tmp_path_factory):
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path_factory.mktemp('log') / 'predictions.db'}")
    else:
        eng = request.getfixturevalue("pg_engine")
    load_log(eng, *log)
    yield eng
    if request.param == "sqlite":
        eng.dispose()


def reference(pred: pd.DataFrame, fb: pd.DataFrame, thr_base: float, windows=WINDOWS,
              width: int = 60) -> dict[str, pd.DataFrame]:
    """Cells per (arm, step, cluster) computed by pandas; the cluster column is called ``minute`` (it is the
    epoch minute for the default width of 60 s, epoch seconds // ``width`` otherwise)."""
    p = pred[(pred.model == "fraud") & pred.arm.isin(["stable", "canary"])].copy()
    p["step"] = np.select([(p.ts >= w[2]) & (p.ts < w[3]) for w in windows], [w[0] for w in windows], -1)
    p = p[p.step >= 0]
    p["minute"] = (p.ts - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=width)
    f = fb[fb.ts <= LOOK_AT].sort_values("ts").groupby("request_id").tail(1).set_index("request_id")["label"]
    p["label"] = p.request_id.map(f)
    ok = (p.status == "ok") & p.prediction.notna()
    vals = {
        "error_rate": (p.status == "error").astype(float),
        "slow": (p.latency_ms > 30).astype(float),
        "slow_base": (p.latency_ms > thr_base).astype(float),
        "score": p.score,
        "no_score": np.where(p.status == "ok", p.score.isna().astype(float), np.nan),
        "mistake": np.where(ok & (p.ts < LOOK_AT - timedelta(seconds=120)) & p.label.notna(),
                            (p.prediction != p.label).astype(float), np.nan),
        "abs_err": np.where(ok & (p.ts < LOOK_AT) & p.label.notna(), (p.prediction - p.label).abs(), np.nan),
    }
    out = {}
    for name, v in vals.items():
        d = p.assign(v=np.asarray(v, dtype=float)).dropna(subset=["v"])
        g = d.assign(v2=d.v**2, canary=d.arm == "canary").groupby(["canary", "step", "minute"])
        out[name] = g.agg(n=("v", "size"), s1=("v", "sum"), s2=("v2", "sum")).reset_index()
    p["eligible"] = ok & (p.ts < LOOK_AT - timedelta(seconds=120))
    out["_labels"] = p
    return out


def frame(cells) -> pd.DataFrame:
    return pd.DataFrame({"canary": cells.canary, "step": cells.step, "minute": cells.cluster, "n": cells.n,
                         "s1": cells.s1, "s2": cells.s2}).sort_values(["canary", "step", "minute"]).reset_index(drop=True)


def assert_cells_match(stats, ref, metrics) -> None:
    """Every metric's (arm, step, minute) cells from the database equal the pandas reference's."""
    for m in metrics:
        got = frame(stats.metrics[m.name])
        want = ref[m.name].sort_values(["canary", "step", "minute"]).reset_index(drop=True)
        assert len(got) == len(want) > 10, m.name
        np.testing.assert_array_equal(got[["canary", "step", "minute"]].to_numpy(),
                                      want[["canary", "step", "minute"]].to_numpy())
        np.testing.assert_allclose(got[["n", "s1", "s2"]].to_numpy(dtype=float),
                                   want[["n", "s1", "s2"]].to_numpy(dtype=float), rtol=1e-9, err_msg=m.name)


def test_look_stats_equals_pandas(engine, log):
    pred, fb = log
    base = baseline(engine, "fraud", T0 - timedelta(seconds=300), T0, POLICY)
    stats = look_stats(engine, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds={"slow_base": base["latency_p95"]})
    ref = reference(pred, fb, base["latency_p95"])
    assert_cells_match(stats, ref, POLICY.metrics)
    p = ref["_labels"]
    for arm in ("stable", "canary"):
        sel = p[p.arm == arm]
        assert stats.labels["mistake"][arm]["eligible"] == int(sel.eligible.sum())
        assert stats.labels["mistake"][arm]["labelled"] == int((sel.eligible & sel.label.notna()).sum())
    for row in stats.traffic:
        sel = p[(p.arm == row["arm"]) & (p.step == row["step"])]
        assert row["requests"] == len(sel)
        assert row["units"] == sel.unit_id.dropna().nunique()
        assert row["percent"] == {0: 10.0, 1: 40.0}[row["step"]]


def test_rows_between_windows_are_left_out(engine, log):
    gap = [(0, 10.0, T0, T0 + timedelta(seconds=300)), (1, 40.0, T0 + timedelta(seconds=700), LOOK_AT)]
    stats = look_stats(engine, "fraud", gap, POLICY, LOOK_AT, thresholds={"slow_base": 25.0})
    ref = reference(*log, 25.0, windows=gap)
    got, want = frame(stats.metrics["error_rate"]), ref["error_rate"]
    assert got.n.sum() == want.n.sum() and got.s1.sum() == want.s1.sum()
    assert got.n.sum() < frame(look_stats(engine, "fraud", WINDOWS, POLICY, LOOK_AT,
                                          thresholds={"slow_base": 25.0}).metrics["error_rate"]).n.sum()


def test_same_numbers_on_both_databases(log, tmp_path, pg_engine):
    sq = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    load_log(sq, *log)
    load_log(pg_engine, *log)
    a = look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds={"slow_base": 25.0})
    b = look_stats(pg_engine, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds={"slow_base": 25.0})
    for m in POLICY.metrics:
        pd.testing.assert_frame_equal(frame(a.metrics[m.name]), frame(b.metrics[m.name]), rtol=1e-12)
    assert a.traffic == b.traffic and a.labels == b.labels


def test_baseline_counts_histogram_sample(engine, log):
    pred, _ = log
    ref = pred[(pred.model == "fraud") & (pred.arm == "stable") & (pred.ts >= T0 - timedelta(seconds=300))
               & (pred.ts < T0)]
    base = baseline(engine, "fraud", T0 - timedelta(seconds=300), T0, POLICY)
    lat = np.sort(ref.latency_ms.to_numpy())
    assert base["requests"] == len(ref)
    assert base["latency_p95"] == pytest.approx(lat[int(np.ceil(0.95 * len(lat))) - 1])
    assert base["rates"]["error_rate"] == pytest.approx((ref.status == "error").mean())
    assert base["rates"]["slow_base"] == pytest.approx((ref.latency_ms > base["latency_p95"]).mean())
    assert "mistake" not in base["rates"]

    counts = arm_counts(engine, "fraud", T0, LOOK_AT)
    win = pred[(pred.model == "fraud") & (pred.ts >= T0) & (pred.ts < LOOK_AT)]
    for arm, c in counts.items():
        assert c["requests"] == int((win.arm == arm).sum())
        assert c["errors"] == int(((win.arm == arm) & (win.status == "error")).sum())

    edges = [0.2, 0.4, 0.6, 0.8]
    h = histogram(engine, "fraud", WINDOWS, "score", edges)
    for arm in ("stable", "canary"):
        s = win[(win.arm == arm) & win.score.notna()].score.to_numpy()
        want = np.bincount(np.searchsorted(edges, s, side="right"), minlength=5)
        assert h[arm] == want.tolist()

    smp = sample_rows(engine, "fraud", T0, LOOK_AT, arm="canary", limit=50)
    assert len(smp) == 50 and set(smp.arm) == {"canary"}
    assert {"amount", "country", "score", "latency_ms"} <= set(smp.columns)
    assert smp.request_id.isin(win[win.arm == "canary"].request_id).all()


def test_bad_windows_and_missing_threshold_are_named(engine):
    with pytest.raises(ValueError, match="window"):
        look_stats(engine, "fraud", [(0, 10.0, T0)], POLICY, LOOK_AT)
    with pytest.raises(ValueError, match="baseline_p95"):
        look_stats(engine, "fraud", WINDOWS, POLICY, LOOK_AT)


def test_sample_is_reproducible_bounded_and_spread(engine, log):
    """The sample is the same on every call, has min(rows, limit) rows, and follows the window's traffic
    (arm shares and time), not one end of it."""
    pred, _ = log
    win = pred[(pred.model == "fraud") & (pred.ts >= T0) & (pred.ts < LOOK_AT) & pred.arm.isin(["stable", "canary"])]
    a = sample_rows(engine, "fraud", T0, LOOK_AT, limit=1000)
    b = sample_rows(engine, "fraud", T0, LOOK_AT, limit=1000)
    assert list(a.request_id) == list(b.request_id) and a.request_id.is_unique and len(a) == 1000
    assert a.request_id.isin(win.request_id).all()
    share = (win.arm == "canary").mean()
    assert abs((a.arm == "canary").mean() - share) < 4 * np.sqrt(share * (1 - share) / 1000)
    first_half = (win.ts < T0 + timedelta(seconds=600)).mean()
    got_half = (pd.to_datetime(a.ts) < T0 + timedelta(seconds=600)).mean()
    assert abs(got_half - first_half) < 4 * np.sqrt(first_half * (1 - first_half) / 1000)
    small = T0 + timedelta(seconds=20)  # fewer rows than the limit: all of them
    every = sample_rows(engine, "fraud", T0, small, limit=1000)
    assert sorted(every.request_id) == sorted(win[win.ts < small].request_id)
    with pytest.raises(ValueError, match="limit=0"):
        sample_rows(engine, "fraud", T0, LOOK_AT, limit=0)
