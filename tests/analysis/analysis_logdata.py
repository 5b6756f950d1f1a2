"""Prediction-log rows for the analysis tests (Contract 2), shared by the SQL tests."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

T0 = datetime(2026, 3, 1, 10, 0, 0)


def make_log(seed: int = 7, n: int = 4000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction and feedback rows (Contract 2) over two steps, with rows that must be left out."""
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(np.sort(rng.uniform(-300, 1500, n)), unit="s").floor("us")
    step_pct = np.where(ts < T0 + timedelta(seconds=600), 10.0, 40.0)
    arm = np.where(rng.random(n) < step_pct / 100, "canary", "stable")
    arm[rng.random(n) < 0.02] = "shadow"
    model = np.where(rng.random(n) < 0.05, "other", "fraud")
    status = np.where(rng.random(n) < np.where(arm == "canary", 0.06, 0.03), "error", "ok")
    score = rng.random(n)
    pred = (score > 0.5).astype(float)
    score[status == "error"] = np.nan
    pred[status == "error"] = np.nan
    score[(status == "ok") & (rng.random(n) < 0.01)] = np.nan  # a model that sometimes answers no score
    lat = rng.lognormal(3.0, 0.5, n)
    units = np.array([f"u{k}" for k in rng.integers(0, 800, n)], dtype=object)
    units[rng.random(n) < 0.1] = None
    pred_df = pd.DataFrame({
        "request_id": [f"r{i:06d}" for i in range(n)], "ts": ts, "model": model, "version": np.where(
            arm == "canary", "v2", "v1"), "arm": arm, "unit_id": units,
        "features": [json.dumps({"amount": float(a), "country": c}) for a, c in
                     zip(rng.lognormal(4, 1, n), rng.choice(["de", "fr", "us"], n), strict=True)],
        "prediction": pred, "score": score, "latency_ms": lat, "status": status, "error": None})
    has = (rng.random(n) < 0.7) & (status == "ok")
    fb_ts = ts[has] + pd.to_timedelta(rng.exponential(120, has.sum()), unit="s").floor("us")
    label = (rng.random(has.sum()) < 0.4).astype(float)
    fb = pd.DataFrame({"request_id": pred_df["request_id"][has].to_numpy(), "ts": fb_ts, "label": label,
                       "correction": None, "source": "test"})
    again = fb.sample(frac=0.1, random_state=seed).copy()  # corrections arriving later: the latest one counts
    again["ts"] = again["ts"] + pd.Timedelta(seconds=30)
    again["label"] = 1.0 - again["label"]
    return pred_df, pd.concat([fb, again], ignore_index=True)


def load_log(engine, pred: pd.DataFrame, fb: pd.DataFrame) -> None:
    """Create the gateway's own schema and insert the rows."""
    from gateway.store import create_schema, feedback, predictions

    create_schema(engine)
    with engine.begin() as c:
        c.execute(predictions.delete())
        c.execute(feedback.delete())
        recs = pred.astype(object).where(pred.notna(), None).to_dict("records")
        for r in recs:
            r["ts"] = r["ts"].to_pydatetime()
        c.execute(predictions.insert(), recs)
        frecs = fb.astype(object).where(fb.notna(), None).to_dict("records")
        for r in frecs:
            r["ts"] = r["ts"].to_pydatetime()
        c.execute(feedback.insert(), frecs)
