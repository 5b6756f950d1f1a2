"""A configurable cluster width (``Policy.cluster_seconds``): the same cells on SQLite and PostgreSQL, on the
one-scan and the joined path, as a pandas computation; width 60 keeps the epoch-minute cells of before.

The log has a fifth of its rows moved onto a 10-second boundary or one microsecond before it, where an
inexact bucket expression would put a row into the neighbouring cluster (SQLite's ``strftime('%s')`` on
the full text rounds ``...:09.999999`` up to the next second; the look cuts the text instead).
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from analysis_logdata import T0, make_log
from canary.analysis import MetricPolicy, Policy, judge
from canary.analysis.policy import PolicyError
from canary.analysis.sql import _bucket, _cells, look_stats
from canary.analysis.stats import ArmStats
from test_analysis_sql import LOOK_AT, POLICY, WINDOWS, assert_cells_match, frame, reference
from test_sql_denormalized import denormalized_engines

PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
THR = {"slow_base": 25.0}


def edge_log():
    """The shared test log with 20 % of the timestamps on a 10 s boundary or 1 microsecond before one."""
    pred, fb = make_log(seed=11)
    rng = np.random.default_rng(3)
    pick = rng.random(len(pred)) < 0.2
    floor = pred.ts.dt.floor("10s")
    onto = np.where(rng.random(len(pred)) < 0.5, floor, floor + pd.Timedelta(seconds=10) - pd.Timedelta(microseconds=1))
    pred.loc[pick, "ts"] = pd.to_datetime(onto[pick])
    return pred, fb


@pytest.fixture(scope="module")
def log():
    return edge_log()


@pytest.fixture(scope="module")
def engines(log, tmp_path_factory):
    """(sqlite, postgresql) engines holding the log with the optional row columns (Contract 2)."""
    yield from denormalized_engines(log, tmp_path_factory.mktemp("width"), "canary_width")


def _policy(width: int) -> Policy:
    return Policy(metrics=POLICY.metrics, cluster_seconds=width)


@pytest.mark.parametrize("width", [10, 60])
@pytest.mark.parametrize("denormalized", [True, False], ids=["one-scan", "joined"])
@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_cells_of_a_width_equal_pandas(engines, log, which, denormalized, width):
    stats = look_stats(engines[which], "fraud", WINDOWS, _policy(width), LOOK_AT, thresholds=THR,
                       denormalized=denormalized)
    ref = reference(*log, THR["slow_base"], width=width)
    assert_cells_match(stats, ref, POLICY.metrics)
    p = ref["_labels"]
    for arm in ("stable", "canary"):
        sel = p[p.arm == arm]
        assert stats.labels["mistake"][arm]["eligible"] == int(sel.eligible.sum())
        assert stats.labels["mistake"][arm]["labelled"] == int((sel.eligible & sel.label.notna()).sum())


@pytest.mark.parametrize("width", [10, 60])
def test_same_numbers_on_both_databases_and_both_paths(engines, width):
    sq, pg = engines
    pol = _policy(width)
    looks = [look_stats(e, "fraud", WINDOWS, pol, LOOK_AT, thresholds=THR, denormalized=d)
             for e in (sq, pg) for d in (True, False)]
    for other in looks[1:]:
        for m in POLICY.metrics:
            pd.testing.assert_frame_equal(frame(looks[0].metrics[m.name]), frame(other.metrics[m.name]),
                                          rtol=1e-12, check_dtype=False, obj=m.name)
        assert other.traffic == looks[0].traffic and other.labels == looks[0].labels


def test_a_shorter_width_gives_more_clusters_with_the_same_totals(engines):
    sq, _ = engines
    wide = look_stats(sq, "fraud", WINDOWS, _policy(60), LOOK_AT, thresholds=THR)
    fine = look_stats(sq, "fraud", WINDOWS, _policy(10), LOOK_AT, thresholds=THR)
    for m in POLICY.metrics:
        a, b = frame(wide.metrics[m.name]), frame(fine.metrics[m.name])
        assert len(b) > 3 * len(a)
        assert a.n.sum() == b.n.sum() and a.s1.sum() == pytest.approx(b.s1.sum(), rel=1e-12)
        assert set(a.minute) == set(b.minute // 6)  # 10 s clusters nest in the epoch minutes
    assert wide.traffic == fine.traffic and wide.labels == fine.labels


def test_default_width_is_the_epoch_minute(engines):
    """Width 60 (the default) gives the cells the look always had: epoch minutes, nothing else changed."""
    sq, pg = engines
    for eng in (sq, pg):
        default = look_stats(eng, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR)
        explicit = look_stats(eng, "fraud", WINDOWS, _policy(60), LOOK_AT, thresholds=THR)
        for m in POLICY.metrics:
            got = frame(default.metrics[m.name])
            pd.testing.assert_frame_equal(got, frame(explicit.metrics[m.name]))
            minutes = {int((t - pd.Timestamp("1970-01-01")) // pd.Timedelta(minutes=1))
                       for t in pd.date_range(T0, LOOK_AT, freq="1min")}
            assert set(got.minute) <= minutes
    assert _bucket("postgresql") == "date_trunc('minute', p.ts)" and _bucket("sqlite") == "substr(p.ts, 1, 16)"


def test_cells_cut_at_every_width_boundary():
    w = [(0, 5.0, T0 + timedelta(seconds=3), T0 + timedelta(seconds=27))]
    cells = _cells(w, width=10)
    assert [(c[2], c[3]) for c in cells] == [
        (T0 + timedelta(seconds=3), T0 + timedelta(seconds=10)),
        (T0 + timedelta(seconds=10), T0 + timedelta(seconds=20)),
        (T0 + timedelta(seconds=20), T0 + timedelta(seconds=27))]
    epoch10 = int((T0 - pd.Timestamp("1970-01-01").to_pydatetime()).total_seconds()) // 10
    assert [c[1] for c in cells] == [epoch10, epoch10 + 1, epoch10 + 2]


def test_frame_input_uses_the_width(engines, log):
    """The judge's DataFrame input clusters by the same width as the SQL (same cells, same verdict)."""
    pol = Policy(metrics=(MetricPolicy("error_rate", "error", critical=True),), cluster_seconds=10)
    pred, _ = log
    p = pred[(pred.model == "fraud") & pred.arm.isin(["stable", "canary"])].copy()
    p["step"] = np.select([(p.ts >= w[2]) & (p.ts < w[3]) for w in WINDOWS], [w[0] for w in WINDOWS], -1)
    p = p[p.step >= 0].assign(error_rate=lambda d: (d.status == "error").astype(float))
    from_frame = ArmStats.from_frame(p, pol)
    from_sql = look_stats(engines[0], "fraud", WINDOWS, pol, LOOK_AT, count_units=False)
    pd.testing.assert_frame_equal(frame(from_frame.metrics["error_rate"]), frame(from_sql.metrics["error_rate"]),
                                  check_dtype=False)
    a, b = judge(from_frame, pol), judge(from_sql, pol)
    assert a.metrics[0].clusters == b.metrics[0].clusters and a.metrics[0].clusters["canary"] > 60


def test_few_clusters_note_names_the_width():
    rng = np.random.default_rng(0)
    n = 4000
    df = pd.DataFrame({"arm": rng.choice(["stable", "canary"], n), "step": 0,
                       "ts": T0 + pd.to_timedelta(rng.uniform(0, 25, n), unit="s"),
                       "err": (rng.random(n) < 0.05).astype(float)})
    for width, tested, words in ((60, False, "3 1-minute clusters"), (5, True, None)):
        pol = Policy(metrics=(MetricPolicy("err", "error"),), cluster_seconds=width)
        ev = judge(df, pol).metrics[0]
        assert ev.tested is tested
        if words:
            assert words in ev.note


@pytest.mark.parametrize("bad", [0, -10, 7, 7200, 59.5, "60", True, None])
def test_bad_width_is_named(bad):
    with pytest.raises(PolicyError, match=r"policy\.cluster_seconds=.*divides 3600"):
        Policy(metrics=POLICY.metrics, cluster_seconds=bad)


def test_width_round_trips_in_the_policy_dict():
    pol = _policy(15)
    assert Policy.from_dict(pol.to_dict()) == pol
    old = pol.to_dict()
    del old["cluster_seconds"]  # a record written before the width existed
    assert Policy.from_dict(old).cluster_seconds == 60
