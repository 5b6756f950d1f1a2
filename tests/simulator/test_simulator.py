"""The traffic simulator against the real gateway: it keeps its rate, stops by itself (or on request), and posts
the true label of each answered request, so label metrics computed from the log are real."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from demo_models.train import train_all
from gateway.testing import run_gateway
from simulator import SimulationConfig, run
from sqlalchemy import create_engine, text


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim-models")
    train_all(out, rows=10_000, log=lambda _m: None)
    return out


def _rows(db_url: str, sql: str) -> list[tuple]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return rows


def test_simulator_sends_at_rate_and_posts_true_labels(models: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'log.db'}"
    with run_gateway(models, db_url) as gw:
        assert gw.set_route("fraud", stable="v1", canary="v2", canary_percent=30, lease_seconds=600).status_code == 200
        fraud = run(gw.url, "fraud", rate=150, duration=4, units=300, label_delay=0.5, seed=11)
        eta = run(gw.url, "eta", rate=60, duration=2, units=100, label_delay=0.2, seed=12)
    assert fraud["sent"] == 600 and fraud["answered"] == 600 and fraud["errors"] == 0
    assert fraud["rate_achieved"] > 150 * 0.85
    assert fraud["per_arm"]["canary"] > 100 and fraud["per_arm"]["stable"] > 300
    assert fraud["feedback_posted"] == 600 and fraud["feedback_failed"] == 0
    assert eta["answered"] == 120 and eta["feedback_posted"] == 120

    logged = _rows(db_url, "SELECT COUNT(*), COUNT(DISTINCT unit_id) FROM predictions WHERE model = 'fraud'")[0]
    assert logged[0] == 600 and logged[1] <= 300
    # the labels belong to their requests: the log's mistake rate and absolute error match offline evaluation
    mismatch = _rows(db_url, """
        SELECT p.version, AVG(CASE WHEN p.prediction <> f.label THEN 1.0 ELSE 0.0 END), COUNT(*)
        FROM predictions p JOIN feedback f ON f.request_id = p.request_id
        WHERE p.model = 'fraud' GROUP BY p.version""")
    rates = {version: (rate, n) for version, rate, n in mismatch}
    assert sum(n for _, n in rates.values()) == 600
    assert 0.03 < rates["v1"][0] < 0.2, rates
    mae = _rows(db_url, """
        SELECT AVG(ABS(p.prediction - f.label)) FROM predictions p JOIN feedback f ON f.request_id = p.request_id
        WHERE p.model = 'eta'""")[0][0]
    assert 1.0 < mae < 4.0, mae  # offline MAE of eta v1 is about 2.3 minutes; random pairing would be ~12
    labels = {row[0] for row in _rows(db_url, "SELECT DISTINCT f.label FROM feedback f JOIN predictions p "
                                              "ON p.request_id = f.request_id WHERE p.model = 'fraud'")}
    assert labels == {0.0, 1.0}


def test_simulator_stops_on_request(models: Path, tmp_path: Path) -> None:
    with run_gateway(models, f"sqlite:///{tmp_path / 'log.db'}") as gw:
        stop = threading.Event()
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(run(gw.url, "fraud", rate=50, duration=600, label_delay=30, stop_event=stop))
        )
        started = time.monotonic()
        thread.start()
        time.sleep(1.0)
        stop.set()
        thread.join(15)
        assert not thread.is_alive() and time.monotonic() - started < 10
    assert result["stopped_early"] is True and 20 <= result["sent"] <= 80
    assert result["feedback_dropped"] == result["answered"] - result["feedback_posted"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"url": "http://10.0.0.5:8808"}, "loopback"),
        ({"url": "http://example.com"}, "loopback"),
        ({"rate": 0}, "rate"),
        ({"duration": -1}, "duration"),
        ({"model": "nope"}, None),
    ],
)
def test_simulator_rejects_bad_settings(kwargs: dict, needle: str | None) -> None:
    settings = {"url": "http://127.0.0.1:9", "model": "fraud", "rate": 10, "duration": 1, **kwargs}
    if needle is None:
        with pytest.raises(ValueError, match="nope"):
            run(**settings)
    else:
        with pytest.raises(ValueError, match=needle):
            SimulationConfig(**settings)
