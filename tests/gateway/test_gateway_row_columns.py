"""The gateway keeps the one-scan row columns of Contract 2 on real traffic: `label`/`label_ts` hold the latest
feedback of each request (a correction replaces it, a repeat changes nothing), `unit_first` flags the first request
of each (model, route generation, arm, unit) across restarts, and `look_stats` on that log takes the one-scan path
with the numbers of the joined path. An existing log without the columns is extended and backfilled at start."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime, timedelta

import canary.analysis.sql as sql_mod
import numpy as np
import pytest
import requests
from canary.analysis import MetricPolicy, Policy
from gateway.routing import utcnow
from gateway.store import create_schema, feedback, make_engine, predictions
from gateway.testing import run_gateway
from gw_util import fraud_requests, predict, query
from sqlalchemy import create_engine

POLICY = Policy(
    metrics=(
        MetricPolicy("error_rate", "error", critical=True),
        MetricPolicy("mistake", "mismatch"),
        MetricPolicy("score", "score", kind="continuous", direction="increase"),
        MetricPolicy("slow", "latency_ms", kind="latency_threshold", threshold=5.0),
    )
)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.rstrip("Z"))


def _as_dt(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _send(session: requests.Session, gw, bodies: list[dict], generation: int, sent: list[dict]) -> None:
    for body in bodies:
        r = predict(session, gw, body)
        assert r.status_code == 200, r.text
        sent.append({"request_id": r.json()["request_id"], "arm": r.json()["arm"], "unit": body.get("unit_id"),
                     "generation": generation})


def _feedback(session: requests.Session, gw, request_id: str, label: float) -> None:
    r = session.post(f"{gw.url}/v1/models/fraud/feedback", json={"request_id": request_id, "label": label},
                     timeout=10)
    assert r.status_code == 202, r.text


def _latest_feedback(db_url: str) -> dict[str, tuple[float, datetime]]:
    """Per request the latest label by the Contract 2 rule (largest ts, ties: the larger label) from history."""
    latest: dict[str, tuple[datetime, float]] = {}
    for rid, ts, label in query(db_url, "SELECT request_id, ts, label FROM feedback"):
        key = (_as_dt(ts), float(label))
        if rid not in latest or key > latest[rid]:
            latest[rid] = key
    return {rid: (label, ts) for rid, (ts, label) in latest.items()}


def _row_columns(db_url: str) -> dict[str, tuple]:
    return {r[0]: (r[1], _as_dt(r[2]), r[3], r[4], r[5])
            for r in query(db_url, "SELECT request_id, label, label_ts, unit_first, arm, unit_id FROM predictions")}


def _frame(cells) -> np.ndarray:
    a = np.column_stack([cells.canary, cells.step, cells.cluster, cells.n, cells.s1, cells.s2]).astype(float)
    return a[np.lexsort((a[:, 2], a[:, 1], a[:, 0]))] if len(a) else a


def _same(a, b) -> None:
    for m in POLICY.metrics:
        fa, fb = _frame(a.metrics[m.name]), _frame(b.metrics[m.name])
        assert fa.shape == fb.shape, m.name
        np.testing.assert_allclose(fa, fb, rtol=1e-12, err_msg=m.name)
    assert a.traffic == b.traffic
    assert a.labels == b.labels


@pytest.fixture
def look_paths(monkeypatch):
    """Which way look_stats read the log: the one-scan function (and whether it counted units) or the others."""
    calls: dict[str, list] = defaultdict(list)
    for name in ("_rows_denormalized", "_rows_joined", "_distinct_units"):
        real = getattr(sql_mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls[_name].append((kwargs.get("with_units"), out))
            return out

        monkeypatch.setattr(sql_mod, name, spy)
    return calls


def test_latest_label_and_unit_flags_on_real_traffic_give_the_one_scan_look(model_dir, db_url, look_paths) -> None:
    sent: list[dict] = []
    session = requests.Session()
    with run_gateway(model_dir, db_url) as gw:
        r1 = gw.set_route("fraud", stable="v1", canary="v2", canary_percent=50, lease_seconds=600)
        assert r1.status_code == 200, r1.text
        bodies = fraud_requests(240, seed=11, units=40)
        for body in bodies[::8]:
            body.pop("unit_id")  # requests without a unit id get no flag
        _send(session, gw, bodies, r1.json()["generation"], sent)
        r2 = gw.set_route("fraud", stable="v1", canary="v2", canary_percent=25, lease_seconds=600)
        assert r2.status_code == 200, r2.text
        _send(session, gw, fraud_requests(240, seed=12, units=40), r2.json()["generation"], sent)
        end = utcnow() + timedelta(milliseconds=1)
        labelled = sent[::2]
        for k, row in enumerate(labelled):
            _feedback(session, gw, row["request_id"], float(k % 2))
        time.sleep(0.05)
        mid_look = utcnow()  # before the corrections: a later look must not change what this one saw
        time.sleep(0.05)
        corrected = labelled[:30]
        for k, row in enumerate(corrected):
            for _ in range(2):  # a corrected label, sent twice
                _feedback(session, gw, row["request_id"], 1.0 - float(k % 2))
        time.sleep(0.05)
        look_at = utcnow()
    session.close()

    rows = _row_columns(db_url)
    assert len(rows) == len(sent), "a prediction row is missing"
    latest = _latest_feedback(db_url)
    assert len(latest) == len(labelled)
    for rid, (label, label_ts, *_rest) in rows.items():
        assert (label, label_ts) == latest.get(rid, (None, None)), rid
    for k, row in enumerate(corrected):
        assert rows[row["request_id"]][0] == 1.0 - float(k % 2)
    assert query(db_url, "SELECT COUNT(*) FROM feedback")[0][0] == len(labelled) + 2 * len(corrected)

    units: dict[tuple[str, int], set] = defaultdict(set)
    flags: dict[tuple[str, int], int] = defaultdict(int)
    for row in sent:
        flag = rows[row["request_id"]][2]
        if row["unit"] is None:
            assert flag is None
            continue
        assert flag in (0, 1)
        units[(row["arm"], row["generation"])].add(row["unit"])
        flags[(row["arm"], row["generation"])] += flag
    assert {k: len(v) for k, v in units.items()} == dict(flags)
    assert len(flags) == 4  # both arms in both generations

    windows = [(0, 50.0, _parse(r1.json()["updated_at"]), _parse(r2.json()["updated_at"])),
               (1, 25.0, _parse(r2.json()["updated_at"]), end)]
    engine = create_engine(db_url)
    try:
        for at in (look_at, mid_look):
            look_paths.clear()
            fast = sql_mod.look_stats(engine, "fraud", windows, POLICY, at)
            assert [w for w, _ in look_paths["_rows_denormalized"]] == [True]
            assert not look_paths["_rows_joined"] and not look_paths["_distinct_units"]
            assert look_paths["_rows_denormalized"][0][1][1] is not None  # units came from the flags
            slow = sql_mod.look_stats(engine, "fraud", windows, POLICY, at, denormalized=False)
            assert look_paths["_rows_joined"] and look_paths["_distinct_units"]
            _same(fast, slow)
            for t in fast.traffic:
                assert t["units"] == len(units[(t["arm"], [r1, r2][t["step"]].json()["generation"])]) > 0
        # each look counts the mistakes against the labels it could see: the first ones for the earlier look
        # (the corrections came after it), the corrected ones for the later look
        pred = dict(query(db_url, "SELECT request_id, prediction FROM predictions"))
        first_label = {row["request_id"]: float(k % 2) for k, row in enumerate(labelled)}
        for at, label_of in ((mid_look, first_label), (look_at, {rid: v[0] for rid, v in latest.items()})):
            stats = sql_mod.look_stats(engine, "fraud", windows, POLICY, at)
            assert stats.metrics["mistake"].n.sum() == len(labelled)  # every labelled request was answered
            assert stats.metrics["mistake"].s1.sum() == sum(pred[rid] != lab for rid, lab in label_of.items())
    finally:
        engine.dispose()


def test_an_existing_log_is_extended_and_backfilled_and_flags_survive_a_restart(model_dir, db_url,
                                                                                  look_paths) -> None:
    engine = make_engine(db_url)
    create_schema(engine)  # the log as an older gateway left it: no row columns
    t0 = utcnow() - timedelta(minutes=5)
    old = [{"request_id": f"old{i}", "ts": t0 + timedelta(seconds=i), "model": "fraud", "version": "v1",
            "arm": "stable", "unit_id": f"u{i % 3}", "features": "{}", "prediction": 0.0, "score": 0.1,
            "latency_ms": 1.0, "status": "ok", "error": None} for i in range(6)]
    fb = [
        {"request_id": "old0", "ts": t0 + timedelta(seconds=60), "label": 1.0},
        {"request_id": "old0", "ts": t0 + timedelta(seconds=90), "label": 0.0},  # the later one counts
        {"request_id": "old1", "ts": t0 + timedelta(seconds=60), "label": 0.0},
        {"request_id": "old1", "ts": t0 + timedelta(seconds=60), "label": 1.0},  # a tie: the larger label
        {"request_id": "old2", "ts": t0 + timedelta(seconds=60), "label": 1.0},
    ]
    with engine.begin() as conn:
        conn.execute(predictions.insert(), old)
        conn.execute(feedback.insert(), [{**f, "correction": None, "source": "old"} for f in fb])
    engine.dispose()

    sent: list[dict] = []
    bodies = fraud_requests(60, seed=21, units=12)
    with run_gateway(model_dir, db_url) as gw:
        route = gw.route("fraud")
        rows = _row_columns(db_url)
        assert [rows[f"old{i}"][:3] for i in range(4)] == [
            (0.0, t0 + timedelta(seconds=90), None),
            (1.0, t0 + timedelta(seconds=60), None),
            (1.0, t0 + timedelta(seconds=60), None),
            (None, None, None),
        ]
        with requests.Session() as session:
            _send(session, gw, bodies[:30], route["generation"], sent)
            _feedback(session, gw, "old2", 0.0)  # feedback on a row logged before the upgrade
    with run_gateway(model_dir, db_url) as gw:  # a restart in the same route generation
        assert gw.route("fraud")["generation"] == route["generation"]
        with requests.Session() as session:
            _send(session, gw, bodies[30:], route["generation"], sent)
    rows = _row_columns(db_url)
    assert rows["old2"][0] == 0.0 and rows["old3"][2] is None
    first = [r for r in sent if rows[r["request_id"]][2] == 1]
    assert sorted(r["unit"] for r in first) == sorted({r["unit"] for r in sent})  # once per unit, over both runs
    assert all(rows[r["request_id"]][2] == 0 for r in sent[30:] if r["unit"] in {x["unit"] for x in sent[:30]})
    index = {r[1]: r for r in query(db_url, "SELECT tablename, indexname FROM pg_indexes")} \
        if db_url.startswith("postgresql") else {r[0]: r for r in query(
            db_url, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_feedback_ts" in index

    # a look over old rows (a unit id, no flag) counts distinct units instead, with the same numbers
    windows = [(0, 0.0, t0, utcnow())]
    engine = create_engine(db_url)
    try:
        fast = sql_mod.look_stats(engine, "fraud", windows, POLICY, utcnow())
        assert look_paths["_rows_denormalized"] and look_paths["_distinct_units"]
        _same(fast, sql_mod.look_stats(engine, "fraud", windows, POLICY, utcnow(), denormalized=False))
        stable = next(t for t in fast.traffic if t["arm"] == "stable")
        assert stable["units"] == len({r["unit"] for r in sent if r["arm"] == "stable"} | {"u0", "u1", "u2"})
    finally:
        engine.dispose()


def test_writer_keeps_the_latest_label_whatever_order_the_feedback_arrives_in(db_url) -> None:
    """Feedback from several gateways can reach the log out of order: an older label never replaces a newer one,
    and at the same ts the larger label wins (the rule of the analysis' feedback join)."""
    from gateway.store import PredictionLog, prediction_row

    engine = make_engine(db_url)
    create_schema(engine, row_columns=True)
    writer = PredictionLog(engine, flush_interval=0.01)
    t = utcnow()
    base = {"ts": t, "model": "fraud", "version": "v1", "arm": "stable", "features": {}, "prediction": 1.0,
            "score": 0.5, "latency_ms": 1.0, "status": "ok", "error": None, "generation": 7}

    def batch(*items: tuple[str, dict]) -> None:
        writer._write(list(items), final=False)

    batch(("p", prediction_row(request_id="a", unit_id="u1", **base)),
          ("p", prediction_row(request_id="b", unit_id="u1", **base)),
          ("f", {"request_id": "a", "ts": t + timedelta(seconds=2), "label": 0.0, "correction": None, "source": None}),
          ("f", {"request_id": "a", "ts": t + timedelta(seconds=1), "label": 1.0, "correction": None, "source": None}))
    batch(("p", prediction_row(request_id="c", unit_id="u1", **base)),
          ("p", prediction_row(request_id="d", unit_id="u2", **base)),
          ("p", prediction_row(request_id="e", unit_id=None, **base)),
          ("f", {"request_id": "a", "ts": t + timedelta(seconds=1), "label": 1.0, "correction": None, "source": None}),
          ("f", {"request_id": "b", "ts": t + timedelta(seconds=3), "label": 0.0, "correction": None, "source": None}))
    batch(("f", {"request_id": "b", "ts": t + timedelta(seconds=3), "label": 1.0, "correction": None, "source": None}),
          ("f", {"request_id": "a", "ts": t + timedelta(seconds=2), "label": -1.0, "correction": None, "source": None}))
    engine.dispose()
    rows = _row_columns(db_url)
    assert {rid: r[:3] for rid, r in rows.items()} == {
        "a": (0.0, t + timedelta(seconds=2), 1),  # the older label 1.0 (sent twice) and the smaller tie lost
        "b": (1.0, t + timedelta(seconds=3), 0),  # the tie at the same ts: the larger label
        "c": (None, None, 0),  # u1 already seen in generation 7 on stable (an earlier batch)
        "d": (None, None, 1),
        "e": (None, None, None),  # no unit id, no flag
    }
    assert query(db_url, "SELECT COUNT(*) FROM feedback")[0][0] == 6  # the history keeps every feedback
