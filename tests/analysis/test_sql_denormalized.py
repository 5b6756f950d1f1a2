"""One-scan look (label and unit flag on the prediction row) gives the numbers of the joined look.

The gateway keeps ``label``/``label_ts`` (the latest feedback) and ``unit_first`` (the first request of a
unit per route generation) on each prediction row (Contract 2). Here the columns are added and filled by
SQL with exactly those rules, on SQLite and on a private PostgreSQL database, and the fast path is checked
against the pandas reference, the joined path and the other database.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from analysis_logdata import T0, load_log, make_log
from canary.analysis import MetricPolicy, Policy
from canary.analysis.sql import _cells, log_columns, look_stats
from sqlalchemy import DateTime, bindparam, create_engine, text
from test_analysis_sql import LOOK_AT, POLICY, WINDOWS, assert_cells_match, frame, reference

PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
THR = {"slow_base": 25.0}


def denormalize(engine, generations) -> None:
    """Add and fill the row columns as the gateway keeps them: the latest feedback per request (ties: the
    larger label) and unit_first = 1 on the first row of each (model, route generation, arm, unit)."""
    gen = " ".join(f"WHEN ts < :g{i} THEN {i}" for i in range(len(generations)))
    params = {f"g{i}": g for i, g in enumerate(generations)}
    with engine.begin() as c:
        for col, typ in (("label", "DOUBLE PRECISION"), ("label_ts", "TIMESTAMP"), ("unit_first", "SMALLINT")):
            c.execute(text(f"ALTER TABLE predictions ADD COLUMN {col} {typ}"))
        c.execute(text("UPDATE predictions SET label = (SELECT f.label FROM feedback f WHERE f.request_id = "
                       "predictions.request_id ORDER BY f.ts DESC, f.label DESC LIMIT 1), label_ts = (SELECT "
                       "MAX(f.ts) FROM feedback f WHERE f.request_id = predictions.request_id)"))
        stmt = text(f"UPDATE predictions SET unit_first = CASE WHEN request_id IN (SELECT request_id FROM ("
                    f"SELECT request_id, ROW_NUMBER() OVER (PARTITION BY model, arm, CASE {gen} ELSE {len(generations)} "
                    "END, unit_id ORDER BY ts, request_id) AS rn FROM predictions WHERE unit_id IS NOT NULL) x "
                    "WHERE rn = 1) THEN 1 ELSE 0 END WHERE unit_id IS NOT NULL"
                    ).bindparams(*[bindparam(k, type_=DateTime()) for k in params])
        c.execute(stmt, params)


@pytest.fixture(scope="module")
def log():
    return make_log()


def denormalized_engines(log, folder, prefix: str):
    """(sqlite, postgresql) engines holding ``log`` with the row columns (Contract 2): a generator for a
    module fixture; the PostgreSQL database is the test's own and dropped afterwards."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    pg = create_engine(PG_URL.rsplit("/", 1)[0] + f"/{name}")
    sq = create_engine(f"sqlite:///{folder / 'predictions.db'}")
    generations = [w[2] for w in WINDOWS] + [WINDOWS[-1][3]]
    for eng in (sq, pg):
        load_log(eng, *log)
        denormalize(eng, generations)
    yield sq, pg
    sq.dispose()
    pg.dispose()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def engines(log, tmp_path_factory):
    """(sqlite, postgresql) engines holding the log with the row columns."""
    yield from denormalized_engines(log, tmp_path_factory.mktemp("row"), "canary_sqlrow")


def _same(a, b) -> None:
    for m in POLICY.metrics:
        pd.testing.assert_frame_equal(frame(a.metrics[m.name]), frame(b.metrics[m.name]), rtol=1e-12,
                                      check_dtype=False, obj=m.name)
    assert a.traffic == b.traffic
    assert a.labels == b.labels


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_one_scan_equals_pandas_and_the_joined_look(engines, log, which):
    eng = engines[which]
    assert {"label", "label_ts", "unit_first"} <= log_columns(eng)
    fast = look_stats(eng, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR)
    ref = reference(*log, THR["slow_base"])
    assert_cells_match(fast, ref, POLICY.metrics)
    p = ref["_labels"]
    for row in fast.traffic:
        sel = p[(p.arm == row["arm"]) & (p.step == row["step"])]
        assert row["requests"] == len(sel) and row["units"] == sel.unit_id.dropna().nunique() > 0
    _same(fast, look_stats(eng, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR, denormalized=False))


def test_labels_after_the_look_come_from_the_feedback_history(engines, log, monkeypatch):
    """Rows whose latest label arrived after the look must use the one received by the look time."""
    import canary.analysis.sql as sql_mod

    seen: list[int] = []
    real = sql_mod._add_late_labels

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sql_mod, "_add_late_labels", spy)
    pred, fb = log
    late = fb[fb.ts > LOOK_AT].request_id
    early = fb[fb.ts <= LOOK_AT].request_id
    assert len(set(late) & set(early)) > 5  # corrections after the look of labels received before it
    sq, pg = engines
    a = look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR)
    b = look_stats(pg, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR)
    _same(a, b)
    assert len(seen) == 2  # both databases read those labels from the history
    # an earlier look sees fewer labels than a later one on the same windows (nothing from the future)
    early_look = look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT - timedelta(seconds=300), thresholds=THR)
    assert early_look.metrics["mistake"].n.sum() < a.metrics["mistake"].n.sum()
    _same(early_look, look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT - timedelta(seconds=300),
                                 thresholds=THR, denormalized=False))


def test_rows_without_the_unit_flag_fall_back_to_distinct_units(engines, log):
    sq, _ = engines
    want = look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR).traffic
    with sq.begin() as c:
        c.execute(text("UPDATE predictions SET unit_first = NULL WHERE request_id IN (SELECT request_id FROM "
                       "predictions WHERE unit_first = 1 AND model = 'fraud' AND arm = 'canary' AND ts >= :s "
                       "LIMIT 5)").bindparams(bindparam("s", type_=DateTime())), {"s": T0})
    try:
        assert look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR).traffic == want
        with sq.begin() as c:  # a wrong flag would show: the fast count differs from the distinct count
            c.execute(text("UPDATE predictions SET unit_first = 0 WHERE unit_first IS NULL AND unit_id IS NOT NULL"))
        flagged = look_stats(sq, "fraud", WINDOWS, POLICY, LOOK_AT, thresholds=THR).traffic
        assert sum(r["units"] for r in flagged) < sum(r["units"] for r in want)
    finally:
        denormalize_units_again(sq)


def denormalize_units_again(eng) -> None:
    generations = [w[2] for w in WINDOWS] + [WINDOWS[-1][3]]
    with eng.begin() as c:
        for col in ("label", "label_ts", "unit_first"):
            c.execute(text(f"ALTER TABLE predictions DROP COLUMN {col}"))
    denormalize(eng, generations)


def test_cells_cover_each_window_once_cut_at_minutes():
    w = [(0, 5.0, T0 + timedelta(seconds=30), T0 + timedelta(seconds=150)),
         (1, 25.0, T0 + timedelta(seconds=200), T0 + timedelta(seconds=260))]
    cells = _cells(w)
    assert [(c[0], c[2], c[3]) for c in cells] == [
        (0, T0 + timedelta(seconds=30), T0 + timedelta(seconds=60)),
        (0, T0 + timedelta(seconds=60), T0 + timedelta(seconds=120)),
        (0, T0 + timedelta(seconds=120), T0 + timedelta(seconds=150)),
        (1, T0 + timedelta(seconds=200), T0 + timedelta(seconds=240)),
        (1, T0 + timedelta(seconds=240), T0 + timedelta(seconds=260))]
    assert cells[1][1] == cells[0][1] + 1


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_label_delay_cutting_a_minute(engines, which):
    """A label delay that ends mid-minute splits that minute's cell; its parts are summed again."""
    pol = Policy(metrics=(MetricPolicy("error_rate", "error"),
                          MetricPolicy("mistake", "mismatch", label_delay_s=95),
                          MetricPolicy("label", "label", kind="continuous", label_delay_s=30)))
    eng = engines[which]
    fast = look_stats(eng, "fraud", WINDOWS, pol, LOOK_AT - timedelta(seconds=7))
    assert fast.metrics["mistake"].n.sum() > 0
    _same_policy(fast, look_stats(eng, "fraud", WINDOWS, pol, LOOK_AT - timedelta(seconds=7), denormalized=False),
                 pol)


def _same_policy(a, b, pol) -> None:
    for m in pol.metrics:
        pd.testing.assert_frame_equal(frame(a.metrics[m.name]), frame(b.metrics[m.name]), rtol=1e-12,
                                      check_dtype=False, obj=m.name)
    assert a.traffic == b.traffic and a.labels == b.labels


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_empty_and_rowless_windows(engines, which):
    eng = engines[which]
    far = T0 + timedelta(days=30)
    empty = look_stats(eng, "fraud", [(0, 10.0, far, far)], POLICY, far, thresholds=THR)
    rowless = look_stats(eng, "fraud", [(0, 10.0, far, far + timedelta(seconds=90))], POLICY,
                         far + timedelta(seconds=90), thresholds=THR)
    for st in (empty, rowless):
        assert st.traffic == [] and all(len(st.metrics[m.name].n) == 0 for m in POLICY.metrics)


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_packed_label_counters_equal_one_aggregate_each(engines, which):
    """The label counts packed into one SUM (eligible + B labelled + B^2 mismatches) decode to the numbers of
    one aggregate each; a base smaller than a cell's requests makes the look read the cells again unpacked."""
    from canary.analysis.sql import PACK_BASE, _rows_denormalized

    pol = Policy(metrics=(*POLICY.metrics, MetricPolicy("sq_err", "squared_error", kind="continuous",
                                                        label_delay_s=45)))
    eng = engines[which]
    with eng.connect() as conn:
        got = {pack: _rows_denormalized(conn, eng.dialect.name, "fraud", WINDOWS, pol, LOOK_AT, THR, True, pack)
               for pack in (PACK_BASE, 4, None)}
    def norm(rows):
        return sorted((r[0], int(r[1]), int(r[2]), *[float(v or 0) for v in r[3:]]) for r in rows[0])
    assert max(r[3] for r in got[None][0]) >= 4  # base 4 is too small for these cells: the fallback ran
    for pack in (PACK_BASE, 4):
        a, b = norm(got[pack]), norm(got[None])
        assert [x[:3] for x in a] == [x[:3] for x in b]
        np.testing.assert_allclose(np.array([x[3:] for x in a]), np.array([x[3:] for x in b]), rtol=1e-12)
        assert got[pack][1] == got[None][1]


def test_postgresql_before_14_cuts_every_cell_by_binary_search(engines, monkeypatch):
    """PostgreSQL 14+ finds a row's cluster with date_bin and only the cut points off the cluster grid by
    binary search; an older server (no date_bin) searches all cut points. Both give the same cells, here
    with windows and a label eligibility time off the minute grid."""
    eng = engines[1]
    off = timedelta(seconds=17)
    w = [(s, p, a + off, b + off) for s, p, a, b in WINDOWS]
    look = LOOK_AT + off - timedelta(seconds=5)
    new = look_stats(eng, "fraud", w, POLICY, look, thresholds=THR)
    assert len({c for m in POLICY.metrics for c in new.metrics[m.name].cluster}) > 10
    monkeypatch.setattr(eng.dialect, "server_version_info", (13, 12))
    old = look_stats(eng, "fraud", w, POLICY, look, thresholds=THR)
    _same(new, old)
    # the unit flags belong to the log's route generations, not to these shifted windows: requests only
    monkeypatch.undo()
    _same(look_stats(eng, "fraud", w, POLICY, look, thresholds=THR, count_units=False),
          look_stats(eng, "fraud", w, POLICY, look, thresholds=THR, count_units=False, denormalized=False))


@pytest.fixture
def own_engines(log, tmp_path):
    """(sqlite in WAL mode, as the gateway keeps it, and postgresql) holding ``log``: this test's own, as it
    writes to them."""
    gen = denormalized_engines(log, tmp_path, "canary_snap")
    sq, pg = next(gen)
    with sq.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")
    yield sq, pg
    next(gen, None)


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_a_label_written_during_the_look_is_not_counted(own_engines, which):
    """The gateway writes labels while a look runs. A label for a request of the first cell arrives after
    the look's scan has read that cell and before its late-label correction: the correction must not see
    it (it would subtract the new label's value from the old one's count). The look reads one snapshot, so
    it equals the look before the write, and so does a look after it (the label came after the look)."""
    from sqlalchemy import event

    eng = own_engines[which]
    look = LOOK_AT
    before = look_stats(eng, "fraud", WINDOWS, POLICY, look, thresholds=THR)
    with eng.connect() as c:
        rid, label = c.execute(text(
            "SELECT request_id, label FROM predictions WHERE model = 'fraud' AND status = 'ok' AND prediction "
            "IS NOT NULL AND label IS NOT NULL AND label_ts <= :look AND ts >= :t0 ORDER BY ts LIMIT 1"
        ).bindparams(bindparam("look", type_=DateTime()), bindparam("t0", type_=DateTime())),
            {"look": look, "t0": WINDOWS[0][2]}).one()
    writer = create_engine(eng.url)
    written: list[str] = []

    def write_label(conn, cursor, statement, *args) -> None:
        scan = "UNION ALL" in statement if which == 0 else "width_bucket" in statement
        if scan and not written:
            late = look + timedelta(seconds=30)
            params = {"rid": rid, "label": 1.0 - label, "late": late}
            with writer.begin() as w:
                w.execute(text("INSERT INTO feedback (request_id, ts, label, source) VALUES (:rid, :late, :label, "
                               "'test')").bindparams(bindparam("late", type_=DateTime())), params)
                w.execute(text("UPDATE predictions SET label = :label, label_ts = :late WHERE request_id = :rid"
                               ).bindparams(bindparam("late", type_=DateTime())), params)
            written.append(statement)

    event.listen(eng, "after_cursor_execute", write_label)
    try:
        during = look_stats(eng, "fraud", WINDOWS, POLICY, look, thresholds=THR)
    finally:
        event.remove(eng, "after_cursor_execute", write_label)
        writer.dispose()
    assert written  # the label was written between the scan and the correction
    _same(before, during)
    _same(before, look_stats(eng, "fraud", WINDOWS, POLICY, look, thresholds=THR))
