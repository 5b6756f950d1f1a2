"""PredictionLogHook against a real SQLite file and a real PostgreSQL database (Contract 2 tables)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from canary.hooks.prediction_log import PredictionLogError, PredictionLogHook

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

_meta = sa.MetaData()
_predictions = sa.Table(
    "predictions", _meta,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("ts", sa.DateTime(timezone=False), nullable=False),
    sa.Column("model", sa.Text), sa.Column("version", sa.Text), sa.Column("arm", sa.Text),
    sa.Column("unit_id", sa.Text), sa.Column("features", sa.Text), sa.Column("prediction", sa.Double),
    sa.Column("score", sa.Double), sa.Column("latency_ms", sa.Double), sa.Column("status", sa.Text),
    sa.Column("error", sa.Text),
)
_feedback = sa.Table(
    "feedback", _meta,
    sa.Column("request_id", sa.Text), sa.Column("ts", sa.DateTime(timezone=False)),
    sa.Column("label", sa.Double), sa.Column("correction", sa.Double), sa.Column("source", sa.Text),
)


def _fill(engine: sa.Engine) -> None:
    """20 stable + 10 canary requests one second apart, labels for the even ones 30 s later, noise rows."""
    _meta.drop_all(engine)
    _meta.create_all(engine)
    rows, fb = [], []
    for i in range(30):
        arm, version = ("stable", "v1") if i < 20 else ("canary", "v2")
        ts = (T0 + timedelta(seconds=i)).replace(tzinfo=None)
        rows.append(dict(request_id=f"r{i}", ts=ts, model="fraud", version=version, arm=arm, unit_id=str(i),
                         features=json.dumps({"x": i}), prediction=1.0, score=0.5, latency_ms=10.0,
                         status="error" if i % 10 == 3 else "ok", error=None))
        if i % 2 == 0:
            fb.append(dict(request_id=f"r{i}", ts=ts + timedelta(seconds=30), label=1.0, correction=None,
                           source="test"))
    # Same times, other model / a shadow arm: never counted.
    rows.append(dict(request_id="other", ts=T0.replace(tzinfo=None), model="churn", version="v1", arm="stable",
                     unit_id=None, features="{}", prediction=0.0, score=None, latency_ms=1.0, status="ok", error=None))
    rows.append(dict(request_id="shadow", ts=T0.replace(tzinfo=None), model="fraud", version="v2", arm="shadow",
                     unit_id=None, features="{}", prediction=0.0, score=None, latency_ms=1.0, status="ok", error=None))
    with engine.begin() as db:
        db.execute(_predictions.insert(), rows)
        db.execute(_feedback.insert(), fb)


def _check_counts(hook: PredictionLogHook) -> None:
    counts = hook.arm_counts("fraud", stable="v1", canary="v2", start=T0, end=T0 + timedelta(seconds=30))
    assert counts == {"stable": {"requests": 20, "errors": 2, "labelled": 0},
                      "canary": {"requests": 10, "errors": 1, "labelled": 0}}
    # Window is [start, end): the row at exactly `end` is not in, the one at `start` is.
    counts = hook.arm_counts("fraud", stable="v1", canary="v2", start=T0 + timedelta(seconds=5),
                             end=T0 + timedelta(seconds=25))
    assert counts["stable"]["requests"] == 15 and counts["canary"]["requests"] == 5
    # Labels: at end = T0+60s, label cutoff = end - 45s = T0+15s: predictions 0..14 made early enough, the even
    # ones labelled (8 labels, all arrived by T0+44s < end).
    end = T0 + timedelta(seconds=60)
    counts = hook.arm_counts("fraud", stable="v1", canary="v2", start=T0, end=end,
                             label_cutoff=end - timedelta(seconds=45))
    assert counts["stable"] == {"requests": 20, "errors": 2, "labelled": 8}
    assert counts["canary"] == {"requests": 10, "errors": 1, "labelled": 0}
    # A label that arrives after the look time does not count, even for an old prediction.
    end = T0 + timedelta(seconds=40)
    counts = hook.arm_counts("fraud", stable="v1", canary="v2", start=T0, end=end, label_cutoff=end)
    assert counts["stable"]["labelled"] == 5  # labels of r0, r2, .., r8 arrived at T0+30..38s; r10 at end
    assert hook.version_count("fraud", version="v2", start=T0, end=T0 + timedelta(hours=1)) == 11


def test_sqlite_connection_counts_per_arm(tmp_path, set_conn):
    path = tmp_path / "predictions.db"
    set_conn("canary_test_log", conn_type="sqlite", host=str(path))
    hook = PredictionLogHook("canary_test_log")
    assert hook.test_connection()[0] is False  # no table yet: says so instead of pretending
    _fill(hook.engine)
    ok, message = hook.test_connection()
    assert ok, message
    _check_counts(hook)
    hook.dispose()


def test_postgres_connection_counts_per_arm_and_hides_password(pg_database, set_conn):
    set_conn("canary_test_pg", conn_type="postgres", host=pg_database.host,
             port=pg_database.port or 5432, login=pg_database.username, password="s3cret-pw",
             schema=pg_database.database)
    hook = PredictionLogHook("canary_test_pg")
    assert hook.sqlalchemy_url.get_backend_name() == "postgresql"
    assert "s3cret-pw" not in hook.get_uri()
    assert hook.sqlalchemy_url.database == pg_database.database
    _fill(hook.engine)  # trust auth: the password is sent and ignored by the server
    assert hook.test_connection()[0]
    _check_counts(hook)
    hook.dispose()


def test_sqlalchemy_url_in_extra(tmp_path, set_conn):
    path = tmp_path / "p.db"
    set_conn("canary_test_url", conn_type="generic", extra={"sqlalchemy_url": f"sqlite:///{path}"})
    hook = PredictionLogHook("canary_test_url")
    _fill(hook.engine)
    assert hook.version_count("fraud", version="v1", start=T0, end=T0 + timedelta(hours=1)) == 20


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"conn_type": "sqlite"}, "set host to the prediction log file path"),
        ({"conn_type": "postgres"}, "has no host"),
        ({"conn_type": "mysql", "host": "x"}, "supports 'sqlite'"),
    ],
)
def test_bad_connections_say_what_to_fix(set_conn, fields, needle):
    set_conn("canary_test_bad", **fields)
    with pytest.raises(PredictionLogError, match=needle):
        PredictionLogHook("canary_test_bad").get_sqlalchemy_engine()


def test_window_rows_sample_labels_and_features(tmp_path, set_conn):
    set_conn("canary_test_rows", conn_type="sqlite", host=str(tmp_path / "rows.db"))
    hook = PredictionLogHook("canary_test_rows")
    _fill(hook.engine)
    end = T0 + timedelta(seconds=35)
    rows = hook.window_rows("fraud", start=T0, end=end, versions={"stable": "v1", "canary": "v2"},
                            with_labels=True, with_features=True)
    assert len(rows) == 30  # the other model and the shadow arm are left out
    assert rows[0]["request_id"] == "r29" and rows[-1]["request_id"] == "r0"  # newest first
    by_id = {r["request_id"]: r for r in rows}
    assert by_id["r0"]["label"] == 1.0 and by_id["r4"]["label"] == 1.0  # arrived at T0+30s, T0+34s < end
    assert by_id["r6"]["label"] is None  # its label arrives at T0+36s, after end
    assert by_id["r1"]["label"] is None  # never labelled
    assert json.loads(by_id["r7"]["features"]) == {"x": 7}
    assert isinstance(by_id["r7"]["ts"], datetime)
    assert len(hook.window_rows("fraud", start=T0, end=end, limit=5)) == 5
    # a bounded sample is spread over the window (the newest 10 would all be from T0+20s on), newest first,
    # and the same on a retry
    sample = hook.window_rows("fraud", start=T0, end=end, versions={"stable": "v1", "canary": "v2"}, limit=10)
    times = [r["ts"] for r in sample]
    assert len(sample) == 10 and times == sorted(times, reverse=True)
    assert min(times) < T0.replace(tzinfo=None) + timedelta(seconds=10) <= max(times) - timedelta(seconds=10)
    assert [r["request_id"] for r in sample] == [r["request_id"] for r in hook.window_rows(
        "fraud", start=T0, end=end, versions={"stable": "v1", "canary": "v2"}, limit=10)]
    # a small limit reads only the rows below a key cut (no sort of the window): still the bottom-k by key
    from canary.analysis.sql import _sample_key

    with hook.engine.connect() as db:
        want = {r[0] for r in db.execute(sa.text(
            f"SELECT p.request_id FROM predictions p WHERE p.model = 'fraud' AND p.arm IN ('stable', 'canary') "
            f"ORDER BY {_sample_key('sqlite')}, p.request_id LIMIT 2"))}
    two = hook.window_rows("fraud", start=T0, end=end, versions={"stable": "v1", "canary": "v2"}, limit=2)
    assert {r["request_id"] for r in two} == want
    only_canary = hook.window_rows("fraud", start=T0, end=end, versions={"canary": "v2"})
    assert {r["arm"] for r in only_canary} == {"canary"} and len(only_canary) == 10
