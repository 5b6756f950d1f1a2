"""Train the demo models on locally generated data with fixed seeds and write the model directory.

    python -m demo_models.train --out var/models [--force] [--rows 40000]

Writes `<out>/<model>/<version>/model.joblib` and `metadata.json` (Contract 1):

- `fraud` (binary classifier): v1 stable (production), v2 a better candidate, v3 trained on last year's data
  (clearly worse on today's traffic although its offline metrics on its own held-out set look fine), v4 broken in
  ways only production shows (errors on a new country, NaN scores above an amount cap, slow feature lookup).
- `eta` (regressor, delivery minutes): v1 production, v2 a better candidate.

Existing version folders are kept (their stage may have been changed by a rollout) unless `--force` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, mean_squared_error, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from demo_models.data import generate
from demo_models.wrappers import FraudModelV4

AMOUNT_CAP = 500.0
SEED = 20240601


@dataclass(frozen=True)
class VersionPlan:
    """How one demo version is trained.

    :param model: model name.
    :param version: version name.
    :param stage: initial registry stage.
    :param kind: `classifier` or `regressor`.
    :param period: data period it is trained on.
    :param build: returns the unfitted estimator.
    :param description: one line for the metadata.
    :param prepare: optional transform of the training data (x, y) -> (x, y), e.g. clipping.
    :param wrap: optional wrapper around the fitted estimator.
    """

    model: str
    version: str
    stage: str
    kind: str
    period: str
    build: Callable[[], Any]
    description: str
    prepare: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    wrap: Callable[[Any], Any] | None = None


def _without_new_market(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = x[:, 5] != 4.0
    x = x[keep].copy()
    x[:, 0] = np.minimum(x[:, 0], AMOUNT_CAP - 1.0)
    return x, y[keep]


def _hgb_classifier() -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=150, learning_rate=0.08, max_leaf_nodes=31, categorical_features=[5], random_state=SEED
    )


PLANS = [
    VersionPlan(
        "fraud",
        "v1",
        "production",
        "classifier",
        "current",
        lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500)),
        "logistic regression on standardised raw features",
    ),
    VersionPlan(
        "fraud",
        "v2",
        "candidate",
        "classifier",
        "current",
        _hgb_classifier,
        "gradient-boosted trees (captures the night x merchant-risk interaction and the distance step)",
    ),
    VersionPlan(
        "fraud",
        "v3",
        "candidate",
        "classifier",
        "last_year",
        _hgb_classifier,
        "gradient-boosted trees trained on last year's data: the fraud pattern has changed since",
    ),
    VersionPlan(
        "fraud",
        "v4",
        "candidate",
        "classifier",
        "current",
        _hgb_classifier,
        "gradient-boosted trees with a feature-store lookup and an amount recalibration; trained before "
        "country 4 launched and on amounts clipped below 500",
        prepare=_without_new_market,
        wrap=lambda est: FraudModelV4(est, known_countries=(0.0, 1.0, 2.0, 3.0), amount_cap=AMOUNT_CAP),
    ),
    VersionPlan(
        "eta",
        "v1",
        "production",
        "regressor",
        "current",
        LinearRegression,
        "linear regression of delivery minutes",
    ),
    VersionPlan(
        "eta",
        "v2",
        "candidate",
        "regressor",
        "current",
        lambda: HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, random_state=SEED),
        "gradient-boosted trees of delivery minutes (captures the traffic x distance interaction)",
    ),
]


def _eval_metrics(kind: str, estimator: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if kind == "classifier":
        proba = estimator.predict_proba(x)[:, 1]
        predicted = (proba >= 0.5).astype(float)
        return {
            "accuracy": round(float(accuracy_score(y, predicted)), 5),
            "auc": round(float(roc_auc_score(y, proba)), 5),
            "log_loss": round(float(log_loss(y, np.clip(proba, 1e-9, 1 - 1e-9))), 5),
        }
    predicted = estimator.predict(x)
    return {
        "mae": round(float(mean_absolute_error(y, predicted)), 5),
        "rmse": round(float(np.sqrt(mean_squared_error(y, predicted))), 5),
    }


def _params(estimator: Any) -> dict[str, Any]:
    inner = getattr(estimator, "estimator", estimator)
    params = inner.get_params(deep=False) if hasattr(inner, "get_params") else {}
    out = {"estimator": type(inner).__name__}
    for key, value in params.items():
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, int | float | str) for v in value):
            out[key] = list(value)
    if inner is not estimator:
        out["wrapper"] = type(estimator).__name__
    if hasattr(inner, "steps"):
        out["steps"] = [name for name, _ in inner.steps]
    return out


def train_version(plan: VersionPlan, rows: int, created_at: datetime) -> tuple[Any, dict]:
    """Fit one version on its period's data; return the artifact and its metadata."""
    data = generate(plan.model, rows, seed=SEED + (0 if plan.period == "current" else 1), period=plan.period)
    x, y = data.features, data.labels
    if plan.prepare is not None:
        x, y = plan.prepare(x, y)
    split = int(len(y) * 0.8)
    estimator = plan.build()
    started = time.perf_counter()
    estimator.fit(x[:split], y[:split])
    fit_seconds = time.perf_counter() - started
    artifact = plan.wrap(estimator) if plan.wrap is not None else estimator
    metrics = _eval_metrics(plan.kind, artifact, x[split:], y[split:])
    meta: dict[str, Any] = {
        "model": plan.model,
        "version": plan.version,
        "kind": plan.kind,
        "features": list(data.names),
        "created_at": created_at.isoformat(timespec="seconds") + "Z",
        "stage": plan.stage,
        "description": plan.description,
        "params": _params(artifact),
        "training_data": {
            "generator": f"demo_models.data.generate('{plan.model}', period='{plan.period}')",
            "period": plan.period,
            "seed": SEED,
            "rows_train": split,
            "rows_eval": len(y) - split,
            "label_rate" if plan.kind == "classifier" else "label_mean": round(float(y.mean()), 5),
            "notes": "rows with country 4 removed, amounts clipped at 499" if plan.prepare else "",
        },
        "eval_metrics": metrics,
        "fit_seconds": round(fit_seconds, 3),
    }
    if plan.kind == "classifier":
        meta["labels"] = [0, 1]
        meta["score_range"] = [0.0, 1.0]
    return artifact, meta


def write_version(out: Path, artifact: Any, meta: dict) -> Path:
    """Write a version folder atomically (temp folder, then rename)."""
    target = out / meta["model"] / meta["version"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{meta['version']}-"))
    joblib.dump(artifact, tmp / "model.joblib")
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def train_all(
    out: Path, force: bool = False, rows: int = 40_000, log: Callable[[str], None] = print
) -> list[Path]:
    """Train every demo version into `out`; keep existing versions unless `force`."""
    out.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(1):  # small data: one thread is faster than an OpenMP team on a shared machine
        return _train_all(out, force, rows, log)


def _train_all(out: Path, force: bool, rows: int, log: Callable[[str], None]) -> list[Path]:
    base = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=len(PLANS))
    written = []
    for i, plan in enumerate(PLANS):
        target = out / plan.model / plan.version
        if target.exists() and not force:
            log(f"{plan.model}/{plan.version}: exists, kept (use --force to retrain)")
            continue
        artifact, meta = train_version(plan, rows, base + timedelta(minutes=i))
        written.append(write_version(out, artifact, meta))
        log(
            f"{plan.model}/{plan.version}: stage={meta['stage']} eval={meta['eval_metrics']} "
            f"fit={meta['fit_seconds']}s -> {target}"
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m demo_models.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--force", action="store_true", help="retrain and overwrite existing versions")
    parser.add_argument("--rows", type=int, default=40_000, help="rows generated per version (80%% train)")
    args = parser.parse_args(argv)
    if args.rows < 1000:
        print(f"error: --rows {args.rows} is too small; use at least 1000", file=sys.stderr)
        return 2
    train_all(args.out, force=args.force, rows=args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
