"""The simulator's CSV replay against the real gateway, with a model nobody in this repository wrote: rows are
sent in order (looping), with the features every serving version needs taken by name from the columns, each
unit keeps its arm, and the label column arrives as feedback on the right request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from gateway.register import register_version
from gateway.testing import run_gateway
from simulator import SimulationConfig, run
from simulator.replay import CsvReplay
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[2]
V1_FEATURES = ["tenure_months", "plan_price", "support_tickets"]
V2_FEATURES = [*V1_FEATURES, "monthly_usage_gb"]  # the candidate uses one more column


def churn_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "customer_id": [f"cust-{seed}-{i}" for i in range(n)],
        "tenure_months": rng.integers(1, 72, n),
        "plan_price": rng.uniform(10, 120, n).round(2),
        "support_tickets": rng.poisson(1.5, n),
        "monthly_usage_gb": rng.gamma(2.0, 10.0, n).round(1),
        "region": rng.choice(["north", "south"], n),  # a text column the model does not use: ignored
    })
    logit = -1.0 - 0.05 * df.tenure_months + 0.02 * df.plan_price + 0.6 * df.support_tickets - 0.03 * df.monthly_usage_gb
    df["churned"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return df


@pytest.fixture(scope="module")
def churn_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """churn/v1 (production, logistic regression on three features) and churn/v2 (candidate, a tree on four)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    out = tmp_path_factory.mktemp("replay-models")
    train = churn_frame(2000, 1)
    joblib.dump(LogisticRegression(max_iter=500).fit(train[V1_FEATURES], train.churned), out / "v1.joblib")
    joblib.dump(DecisionTreeClassifier(max_depth=5, random_state=0).fit(train[V2_FEATURES], train.churned),
                out / "v2.joblib")
    models = out / "models"
    register_version(models, "churn", "v1", out / "v1.joblib", "classifier", stage="production")
    register_version(models, "churn", "v2", out / "v2.joblib", "classifier")
    return models


def _rows(db_url: str, sql: str) -> list[tuple]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return rows


def test_replay_sends_rows_in_order_with_the_features_and_posts_the_labels(churn_models, tmp_path):
    data = churn_frame(120, 7)
    data.loc[5, "support_tickets"] = np.nan  # an empty cell is sent as null (NaN for the model)
    data.loc[7, "churned"] = np.nan  # no label: no feedback for this row
    csv = tmp_path / "traffic.csv"
    data.to_csv(csv, index=False)
    db_url = f"sqlite:///{tmp_path / 'log.db'}"
    with run_gateway(churn_models, db_url) as gw:
        assert gw.set_route("churn", stable="v1", canary="v2", canary_percent=50, lease_seconds=600).status_code == 200
        summary = run(gw.url, "churn", rate=100, duration=3, label_delay=0.3, csv=csv, label_column="churned",
                      unit_column="customer_id", seed=3)
    assert summary["source"] == f"csv:{csv}"
    assert summary["sent"] == 300 and summary["answered"] == 300, summary
    # the empty cell of row 5 is a NaN for the model: v1 (logistic regression) raises on it (HTTP 500, logged as
    # an error), v2 (a tree) handles missing values. Which one answers depends on the row's arm.
    row5_arm = _rows(db_url, "SELECT DISTINCT arm FROM predictions WHERE unit_id = 'cust-7-5'")
    errors = 3 if row5_arm == [("stable",)] else 0
    assert summary["errors"] == errors and summary["status_counts"].get("500", 0) == errors, summary
    assert summary["per_arm"]["canary"] > 50 and summary["per_arm"]["stable"] > 50, summary
    # 300 requests over 120 rows: rows 0-59 were sent three times, the others twice; row 7 has no label
    assert summary["feedback_posted"] == 300 - 3 - errors and summary["feedback_failed"] == 0, summary

    logged = _rows(db_url, "SELECT unit_id, arm, version, features, ts FROM predictions WHERE model = 'churn' "
                           "ORDER BY ts, request_id")
    assert len(logged) == 300
    by_unit = data.set_index("customer_id")
    arms: dict[str, set[str]] = {}
    for unit_id, arm, version, features, _ts in logged:
        row = by_unit.loc[unit_id]
        sent = json.loads(features)
        needed = V2_FEATURES if version == "v2" else V1_FEATURES
        assert set(sent) == set(needed)  # the gateway logs the features of the version that answered
        for name in needed:
            expected = None if pd.isna(row[name]) else float(row[name])
            assert sent[name] == expected, (unit_id, name, sent[name], expected)
        assert version == ("v2" if arm == "canary" else "v1")
        arms.setdefault(unit_id, set()).add(arm)
    assert len(arms) == 120 and all(len(a) == 1 for a in arms.values())  # a unit keeps its arm
    counts = pd.Series([u for u, *_ in logged]).value_counts()
    assert set(counts[data.customer_id[:60]]) == {3} and set(counts[data.customer_id[60:]]) == {2}
    # the first requests are the first rows of the file, in order (one worker per connection may reorder
    # neighbours by a few milliseconds, so compare the first ten as a set)
    assert {u for u, *_ in logged[:10]} <= set(data.customer_id[:14])

    labels = _rows(db_url, "SELECT p.unit_id, f.label, f.source FROM feedback f JOIN predictions p "
                           "ON p.request_id = f.request_id WHERE p.model = 'churn'")
    assert len(labels) == 297 - errors
    for unit_id, label, source in labels:
        assert label == by_unit.loc[unit_id, "churned"] and source == "simulator"
    assert "cust-7-7" not in {u for u, *_ in labels}


def test_without_unit_column_units_are_a_stable_hash_of_the_row(churn_models, tmp_path):
    csv = tmp_path / "traffic.csv"
    churn_frame(40, 8).drop(columns=["customer_id"]).to_csv(csv, index=False)
    db_url = f"sqlite:///{tmp_path / 'log.db'}"
    with run_gateway(churn_models, db_url) as gw:
        summary = run(gw.url, "churn", rate=80, duration=1, csv=csv, seed=1)
    assert summary["answered"] == 80 and summary["feedback_posted"] == 0  # no label column: no feedback
    units = _rows(db_url, "SELECT unit_id, COUNT(*) FROM predictions GROUP BY unit_id")
    assert len(units) == 40 and {n for _, n in units} == {2}
    assert all(u.startswith("row-") and len(u) == 20 for u, _ in units)
    replay = CsvReplay(csv, {"v1": V1_FEATURES})
    assert replay.units == CsvReplay(csv, {"v1": V1_FEATURES}).units  # stable across runs


def test_replay_errors_name_the_column_and_the_fix(churn_models, tmp_path):
    without_usage = tmp_path / "no_usage.csv"
    churn_frame(10, 9).drop(columns=["monthly_usage_gb"]).to_csv(without_usage, index=False)
    text_feature = tmp_path / "text_feature.csv"
    churn_frame(10, 9).assign(plan_price="cheap").to_csv(text_feature, index=False)
    ok = tmp_path / "ok.csv"
    churn_frame(10, 9).to_csv(ok, index=False)
    with run_gateway(churn_models, f"sqlite:///{tmp_path / 'log.db'}") as gw:
        with pytest.raises(ValueError, match=r"missing feature column\(s\) \['monthly_usage_gb'\] needed by "
                                             r"version\(s\) v2 \['monthly_usage_gb'\]"):
            _build_simulation(gw.url, "churn", without_usage)
        with pytest.raises(ValueError, match=r"feature column 'plan_price' is not numeric \(e.g. 'cheap'\)"):
            _build_simulation(gw.url, "churn", text_feature)
        with pytest.raises(ValueError, match=r"--label-column='label': no such column"):
            _build_simulation(gw.url, "churn", ok, label_column="label")
        with pytest.raises(ValueError, match=r"model='churm' is not registered.*\['churn'\].*gateway.register"):
            _build_simulation(gw.url, "churm", ok)
        with pytest.raises(ValueError, match=r"the demo data generator knows.*--csv FILE"):
            _build_simulation(gw.url, "churn", None)
        with pytest.raises(ValueError, match=r"also pass --csv FILE"):
            SimulationConfig(url=gw.url, model="churn", rate=1, duration=1, label_column="churned")

        env = {**os.environ, "PYTHONPATH": f"{REPO / 'include'}{os.pathsep}{REPO / 'plugins'}"}
        cli = subprocess.run(
            [sys.executable, "-m", "simulator", "--url", gw.url, "--model", "churn", "--rate", "5", "--duration",
             "1", "--csv", str(without_usage), "--label-column", "churned"],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert cli.returncode == 2 and "error: csv=" in cli.stderr and "monthly_usage_gb" in cli.stderr, cli.stderr
        rows = _rows(f"sqlite:///{tmp_path / 'log.db'}", "SELECT COUNT(*) FROM predictions")
    assert rows == [(0,)]  # nothing was sent


def _build_simulation(url, model, csv, **kwargs):
    """Build the simulation the way the CLI does (the checks happen before any request is sent)."""
    from simulator import Simulation

    config = SimulationConfig(url=url, model=model, rate=5, duration=1, csv=csv, **kwargs)
    return Simulation(config)
