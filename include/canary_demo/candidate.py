"""The demo's good candidate: what a training pipeline would register next to the demo models.

``fraud/v5`` is stable's model family (a logistic regression, so just as fast per request) trained on
engineered features that capture what v1 misses: the night pattern and its interaction with merchant risk,
the distance step and the country effect. It is more accurate than v1 without costing latency, so a
rollout should promote it. (``v2``, gradient-boosted trees, is more accurate too, but slower per request:
the spec's latency guardrail rightly rolls it back.)

The feature function lives in this importable module so the pickled pipeline can be loaded by the gateway
(``include/`` is on its path).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

CANDIDATE = "v5"


def fraud_features(x: np.ndarray) -> np.ndarray:
    """Engineered features from the raw fraud features (amount, hour, account_age_days, tx_last_24h,
    merchant_risk, country, distance_km), in that order."""
    x = np.asarray(x, dtype=float)
    amount, hour, age, tx, risk, country, distance = (x[:, i] for i in range(7))
    night = (hour < 6).astype(float)
    countries = np.column_stack([(country == c).astype(float) for c in (1.0, 2.0, 3.0, 4.0)])
    return np.column_stack([
        np.log(np.maximum(amount, 0.01) / 45.0), night, np.log1p(np.maximum(age, 0.0) / 30.0), tx, risk,
        risk * night, (distance > 40.0).astype(float), countries,
    ])


def register_good_candidate(model_dir: Path) -> Path:
    """Train ``fraud/v5`` and write it into ``model_dir`` with the demo models' metadata format."""
    from demo_models.train import VersionPlan, train_version, write_version
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    plan = VersionPlan(
        "fraud", CANDIDATE, "candidate", "classifier", "current",
        lambda: make_pipeline(FunctionTransformer(fraud_features), StandardScaler(),
                              LogisticRegression(C=1.0, max_iter=1000)),
        "logistic regression on engineered features (night x merchant risk, distance step, country): "
        "as fast as v1, more accurate",
    )
    artifact, meta = train_version(plan, 40_000, datetime.now(UTC).replace(tzinfo=None))
    return write_version(Path(model_dir), artifact, meta)
