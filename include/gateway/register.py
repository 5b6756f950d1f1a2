"""Register your own model version in the gateway's model directory (Contract 1), with checked metadata.

    python -m gateway.register --model-dir var/models --model churn --version v1 --artifact churn.joblib \\
        --kind classifier [--features tenure_months,plan_price,support_tickets] [--stage production] \\
        [--eval-csv holdout.csv --label-column churned] [--description "..."] [--labels 0,1] [--score-range 0,1]

or from Python: ``gateway.register.register_version(model_dir, "churn", "v1", "churn.joblib", "classifier")``.

Why a tool rather than "copy the file and write the JSON by hand": the gateway refuses a version whose metadata
does not fit (wrong kind, features in another order than the estimator's, string class labels that the
prediction log cannot store as numbers), and it says so only when a rollout already tries to route to it. This
tool checks all of that before the version exists: it loads the artifact, runs one prediction through the
gateway's own adapter (`gateway.registry.LoadedModel`), computes the offline metrics under the same names the
demo models use, and writes the folder atomically (a temporary folder renamed into place), so a gateway
scanning the directory never sees half a version. `--stage production` archives the previous production
version through the gateway's own registry code (`ModelRegistry.set_stage`), exactly like
`PUT /v1/models/{model}/versions/{version}/stage`.

Loading a joblib file runs code: register only artifacts you trust (the model directory is admin-only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.names import InvalidName, check_name
from gateway.registry import (
    ARTIFACT,
    KINDS,
    METADATA,
    LoadedModel,
    ModelRegistry,
    UnloadableVersion,
    _is_number,
    _plain,
    check_metadata,
)

#: Stages a new version may be registered in (archived makes no sense for a new version).
REGISTER_STAGES = ("candidate", "production")


class RegistrationError(ValueError):
    """A version that cannot be registered; the message names the field, the value and the fix."""


def register_version(
    model_dir: str | Path,
    model: str,
    version: str,
    artifact: str | Path,
    kind: str,
    *,
    features: list[str] | None = None,
    stage: str = "candidate",
    eval_csv: str | Path | None = None,
    label_column: str | None = None,
    description: str = "",
    labels: list[float] | None = None,
    score_range: tuple[float, float] | list[float] | None = None,
    force: bool = False,
    created_at: datetime | None = None,
) -> dict:
    """Check `artifact` and write `<model_dir>/<model>/<version>/model.joblib` + `metadata.json`.

    :param model_dir: the gateway's model directory (created when missing).
    :param model: model name (the gateway's name rule).
    :param version: version name (the same rule); an existing one is refused unless `force`.
    :param artifact: a joblib file holding an object with `predict` (regressor) or `predict_proba`/`predict`
        (classifier).
    :param kind: `classifier` or `regressor`.
    :param features: feature names in the order the estimator expects; inferred from `feature_names_in_`
        (estimators fitted on a pandas DataFrame) when None, and checked against it when both exist.
    :param stage: `candidate` (default) or `production` (archives the previous production version).
    :param eval_csv: held-out rows (a header with the feature names and `label_column`) for `eval_metrics`.
    :param label_column: the true label's column in `eval_csv`.
    :param description: one line for the metadata.
    :param labels: allowed labels (classifiers; default: the estimator's `classes_`).
    :param score_range: `[lo, hi]` of the score (default `[0, 1]` for a classifier with `predict_proba`).
    :param force: replace an existing version folder.
    :param created_at: the registration time (default now, UTC).
    :returns: the metadata written.
    :raises RegistrationError: with the field, the value and the fix.
    """
    model_dir = Path(model_dir)
    try:
        check_name("model", model)
        check_name("version", version)
    except InvalidName as exc:
        raise RegistrationError(str(exc)) from None
    if kind not in KINDS:
        raise RegistrationError(f"kind={kind!r}: must be one of {list(KINDS)} (--kind classifier|regressor)")
    if stage not in REGISTER_STAGES:
        raise RegistrationError(
            f"stage={stage!r}: a new version is registered as one of {list(REGISTER_STAGES)} (--stage); "
            f"archive old versions with PUT /v1/models/{model}/versions/<v>/stage"
        )
    if (eval_csv is None) != (label_column is None):
        raise RegistrationError(
            f"eval_csv={eval_csv!r} label_column={label_column!r}: give both --eval-csv and --label-column "
            "(the held-out rows and the column with their true label), or neither"
        )
    artifact = Path(artifact)
    target = model_dir / model / version
    if target.exists() and not force:
        raise RegistrationError(
            f"version {model}/{version} already exists at {target}; choose a new --version (versions are "
            "immutable: the prediction log and past rollouts refer to them), or pass --force to replace it"
        )
    if not artifact.is_file():
        raise RegistrationError(f"artifact={str(artifact)!r}: no such file; pass the path of your joblib dump")

    estimator = _load_artifact(artifact)
    classes = _check_interface(estimator, kind)
    features = _resolve_features(estimator, features)
    frame = _read_eval_csv(Path(eval_csv), label_column, features) if eval_csv is not None else None

    # The dry run goes through the gateway's own adapter: what passes here is what the gateway will answer.
    loaded = LoadedModel(model, version, kind, list(features), estimator)
    row = [float(v) for v in frame[features].iloc[0].tolist()] if frame is not None else [0.0] * len(features)
    try:
        prediction, score = loaded.predict(row)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported with the row
        raise RegistrationError(
            f"artifact={str(artifact)!r}: the dry-run prediction failed on the row {dict(zip(features, row, strict=True))} "
            f"({type(exc).__name__}: {exc}); check --features (names and order must be the ones the model was "
            "trained on) and that the model accepts one row"
        ) from exc
    if not _is_number(prediction):
        raise RegistrationError(
            f"artifact={str(artifact)!r}: the dry-run prediction is {prediction!r}, not a number; the prediction log "
            "stores predictions as numbers (Contract 2), so encode class labels as numbers (e.g. 0/1) and retrain"
        )

    meta: dict[str, Any] = {
        "model": model,
        "version": version,
        "kind": kind,
        "features": list(features),
        "created_at": (created_at or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
        .isoformat(timespec="seconds") + "Z",
        "stage": "candidate",  # production is set below through the registry, which archives the old one
        "description": description,
        "params": _params(estimator),
        "training_data": {"artifact_source": str(artifact.resolve()), "artifact_sha256": _sha256(artifact)},
        "eval_metrics": {},
        "dry_run": {"features": dict(zip(features, row, strict=True)), "prediction": prediction, "score": score},
    }
    if frame is not None:
        y = frame[label_column].to_numpy(dtype=float)
        meta["eval_metrics"] = _eval_metrics(kind, estimator, frame[features], y, classes)
        meta["training_data"].update({
            "eval_csv": str(Path(eval_csv).resolve()),
            "label_column": label_column,
            "rows_eval": len(frame),
            "label_rate" if kind == "classifier" else "label_mean": round(float(y.mean()), 5),
        })
    if kind == "classifier":
        allowed = labels if labels is not None else ([_plain(c) for c in classes] if classes is not None else None)
        if allowed is not None:
            if not all(_is_number(v) for v in allowed):
                raise RegistrationError(
                    f"labels={allowed!r}: labels must be numbers (the log stores labels and predictions as "
                    "numbers); encode the classes as 0/1/... and retrain, or pass --labels 0,1"
                )
            meta["labels"] = [_plain(v) for v in allowed]
        if score_range is None and hasattr(estimator, "predict_proba"):
            score_range = (0.0, 1.0)
    elif labels is not None:
        raise RegistrationError(f"labels={labels!r}: only classifiers have a label set; drop --labels for a regressor")
    if score_range is not None:
        lo, hi = (float(v) for v in score_range)
        if not lo < hi:
            raise RegistrationError(f"score_range={list(score_range)!r}: needs lo < hi, e.g. --score-range 0,1")
        meta["score_range"] = [lo, hi]

    try:
        check_metadata(json.loads(json.dumps(meta)), model, version)
    except UnloadableVersion as exc:  # a bug here rather than a user error, but say what is wrong
        raise RegistrationError(str(exc)) from None
    _write_version(model_dir, target, artifact, meta)
    if stage == "production":
        registry = ModelRegistry(model_dir)
        registry.scan()
        registry.set_stage(model, version, "production")
        meta = json.loads((target / METADATA).read_text())
    return meta


# ------------------------------------------------------------------------------------------------ checks


def _load_artifact(artifact: Path) -> Any:
    import joblib

    try:
        return joblib.load(artifact)
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways; all mean "not usable"
        if isinstance(exc, ModuleNotFoundError):
            raise RegistrationError(
                f"artifact={str(artifact)!r}: joblib cannot import a module the model was pickled with ({exc}); "
                "put the folder holding that module on the PYTHONPATH of this command and of the gateway, or "
                "install the package that provides it"
            ) from exc
        if isinstance(exc, AttributeError) and "Can't get attribute" in str(exc):
            raise RegistrationError(
                f"artifact={str(artifact)!r}: joblib cannot find a class it was pickled with ({exc}). A class "
                "defined in the training script itself (__main__) cannot be loaded anywhere else: move it into a "
                "module (e.g. my_models.py), import it from there when training, dump again, and put that "
                "module on the PYTHONPATH of this command and of the gateway"
            ) from exc
        raise RegistrationError(
            f"artifact={str(artifact)!r}: joblib cannot load it ({type(exc).__name__}: {exc}); save it with "
            "joblib.dump(model, path) in an environment with the same library versions as the gateway "
            "(see constraints.txt), and make any custom class importable by the gateway (PYTHONPATH)"
        ) from exc


def _resolve_features(estimator: Any, features: list[str] | None) -> list[str]:
    fitted = getattr(estimator, "feature_names_in_", None)
    fitted = [str(f) for f in fitted] if fitted is not None else None
    if features is not None:
        features = [f.strip() if isinstance(f, str) else f for f in features]
        bad = [f for f in features if not isinstance(f, str) or not f]
        if bad or not features:
            raise RegistrationError(f"features={features!r}: give non-empty names, e.g. --features a,b,c")
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise RegistrationError(f"features={features!r}: {dupes} listed twice; list each feature once")
        if fitted is not None and fitted != features:
            raise RegistrationError(
                f"features={features!r} disagree with the estimator's feature_names_in_ {fitted} (names and order "
                "it was fitted on); omit --features to use the fitted ones, or pass exactly "
                f"--features {','.join(fitted)}"
            )
    elif fitted is not None:
        features = fitted
    else:
        n = getattr(estimator, "n_features_in_", None)
        raise RegistrationError(
            "features=None: the estimator has no feature_names_in_ (it was fitted on an array, not a DataFrame), "
            f"so name its {n if n is not None else 'N'} input columns in order with --features a,b,c"
        )
    n = getattr(estimator, "n_features_in_", None)
    if n is not None and int(n) != len(features):
        raise RegistrationError(
            f"features={features!r}: {len(features)} names, but the estimator was fitted on {int(n)} columns; "
            "list exactly the columns it was trained on, in training order"
        )
    return list(features)


def _check_interface(estimator: Any, kind: str) -> list | None:
    """The estimator's classes (classifiers), after checking it has the methods the gateway calls."""
    has_proba, has_predict = hasattr(estimator, "predict_proba"), hasattr(estimator, "predict")
    classes = getattr(estimator, "classes_", None)
    if kind == "regressor":
        if not has_predict:
            raise RegistrationError(
                f"kind='regressor': {type(estimator).__name__} has no predict(); register an object with predict(X)"
            )
        if has_proba:
            raise RegistrationError(
                f"kind='regressor': {type(estimator).__name__} has predict_proba, so it looks like a classifier; "
                "use --kind classifier (the gateway then answers the class and its probability)"
            )
        return None
    if not (has_proba or has_predict):
        raise RegistrationError(
            f"kind='classifier': {type(estimator).__name__} has neither predict_proba() nor predict(); "
            "register a fitted estimator or a wrapper object with one of them"
        )
    if classes is None and not has_proba:
        # a regressor registered as a classifier would answer values as "classes" and no score: every label
        # metric (mistake rate) would then compare a price with a 0/1 label
        raise RegistrationError(
            f"kind='classifier': {type(estimator).__name__} has neither classes_ nor predict_proba(), so it "
            "looks like a regressor; use --kind regressor, or register a classifier (scikit-learn classifiers "
            "have classes_)"
        )
    if classes is not None:
        classes = list(classes)
        if not all(_is_number(c) for c in classes):
            raise RegistrationError(
                f"kind='classifier': classes_={[_plain(c) for c in classes]!r} are not numbers; the prediction log "
                "stores predictions and labels as numbers (Contract 2), so encode the classes as 0/1/... and retrain"
            )
    return classes


def _read_eval_csv(path: Path, label_column: str, features: list[str]) -> Any:
    import pandas as pd

    if not path.is_file():
        raise RegistrationError(f"eval_csv={str(path)!r}: no such file; pass a CSV with a header row")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - parser errors, encodings, empty files
        raise RegistrationError(f"eval_csv={str(path)!r}: cannot read it as CSV ({exc})") from exc
    missing = [c for c in [*features, label_column] if c not in frame.columns]
    if missing:
        raise RegistrationError(
            f"eval_csv={str(path)!r}: missing column(s) {missing}; it has {list(frame.columns)}. The CSV needs "
            "every feature and the label column (--label-column)"
        )
    if frame.empty:
        raise RegistrationError(f"eval_csv={str(path)!r}: no rows; give held-out rows to evaluate on")
    for column in [*features, label_column]:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            if pd.api.types.is_bool_dtype(frame[column]):
                frame[column] = frame[column].astype(float)
                continue
            example = frame[column].dropna().iloc[0] if frame[column].notna().any() else None
            raise RegistrationError(
                f"eval_csv={str(path)!r}: column {column!r} is not numeric (e.g. {example!r}); the gateway takes "
                "numbers (or null) only: encode it as numbers in the CSV and in your model"
            )
    if frame[label_column].isna().any():
        raise RegistrationError(
            f"eval_csv={str(path)!r}: column {label_column!r} has {int(frame[label_column].isna().sum())} empty "
            "labels; drop those rows from the held-out set"
        )
    return frame


def _eval_metrics(kind: str, estimator: Any, x: Any, y: Any, classes: list | None) -> dict:
    """Offline metrics under Contract 1's names (accuracy/auc/log_loss or mae/rmse), on the answers the gateway
    would give: a classifier's prediction is its most probable class, its score the last class's probability."""
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        log_loss,
        mean_absolute_error,
        mean_squared_error,
        roc_auc_score,
    )

    data = x if hasattr(estimator, "feature_names_in_") else x.to_numpy(dtype=float)
    try:
        if kind == "regressor":
            predicted = np.asarray(estimator.predict(data), dtype=float)
            return {
                "mae": round(float(mean_absolute_error(y, predicted)), 5),
                "rmse": round(float(np.sqrt(mean_squared_error(y, predicted))), 5),
            }
        if not hasattr(estimator, "predict_proba"):
            predicted = np.asarray(estimator.predict(data), dtype=float)
            return {"accuracy": round(float(accuracy_score(y, predicted)), 5)}
        proba = np.asarray(estimator.predict_proba(data), dtype=float)
    except Exception as exc:  # noqa: BLE001 - the user's model failing on its own held-out rows
        raise RegistrationError(
            f"eval_csv: the model failed on the held-out rows ({type(exc).__name__}: {exc}); check the CSV's "
            "values and --features"
        ) from exc
    cls = np.asarray(classes if classes is not None else list(range(proba.shape[1])), dtype=float)
    predicted = cls[np.argmax(proba, axis=1)]
    metrics = {"accuracy": round(float(accuracy_score(y, predicted)), 5)}
    unknown = sorted(set(np.unique(y).tolist()) - set(cls.tolist()))
    if unknown:
        raise RegistrationError(
            f"eval_csv: labels {unknown} in the label column are not among the model's classes {cls.tolist()}; "
            "check --label-column and the label encoding"
        )
    if len(cls) == 2 and len(np.unique(y)) == 2:
        metrics["auc"] = round(float(roc_auc_score(y == cls[-1], proba[:, -1])), 5)
    clipped = np.clip(proba, 1e-9, 1 - 1e-9)
    metrics["log_loss"] = round(float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=cls)), 5)
    return metrics


# ------------------------------------------------------------------------------------------------ writing


def _write_version(model_dir: Path, target: Path, artifact: Path, meta: dict) -> None:
    """Temporary folder next to the target, then one rename: a scanning gateway never sees half a version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copyfile(artifact, tmp / ARTIFACT)
        with open(tmp / METADATA, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if target.exists():  # --force: move the old folder aside first, so the rename below cannot fail on it
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _params(estimator: Any) -> dict[str, Any]:
    """JSON-friendly hyper-parameters (the estimator class, plain-valued params, pipeline step names)."""
    params = estimator.get_params(deep=False) if hasattr(estimator, "get_params") else {}
    out: dict[str, Any] = {"estimator": type(estimator).__name__}
    for key, value in params.items():
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        elif isinstance(value, list | tuple) and all(isinstance(v, int | float | str) for v in value):
            out[key] = list(value)
    if hasattr(estimator, "steps"):
        out["steps"] = [name for name, _ in estimator.steps]
        out["final_estimator"] = type(estimator.steps[-1][1]).__name__
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ CLI


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",")]


def _numbers(text: str | None, option: str, count: int | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RegistrationError(f"{option}={text!r}: give numbers separated by commas, e.g. {option} 0,1") from None
    if count is not None and len(values) != count:
        raise RegistrationError(f"{option}={text!r}: give exactly {count} numbers, e.g. {option} 0,1")
    return [int(v) if v.is_integer() and option == "--labels" else v for v in values]


def main(argv: list[str] | None = None) -> int:
    """Parse the options, register the version, print its metadata as JSON (exit 2 on a refused input)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.register", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path, help="the gateway's model directory")
    parser.add_argument("--model", required=True, help="model name, e.g. churn")
    parser.add_argument("--version", required=True, help="new version name, e.g. v1")
    parser.add_argument("--artifact", required=True, type=Path, help="joblib dump of the fitted model")
    parser.add_argument("--kind", required=True, choices=KINDS, help="classifier or regressor")
    parser.add_argument("--features", help="feature names in model order, comma-separated (default: the "
                                           "estimator's feature_names_in_)")
    parser.add_argument("--stage", default="candidate", choices=REGISTER_STAGES,
                        help="candidate (default) or production (archives the previous production version)")
    parser.add_argument("--eval-csv", type=Path, help="held-out rows for eval_metrics (needs --label-column)")
    parser.add_argument("--label-column", help="column of the true label in --eval-csv")
    parser.add_argument("--description", default="", help="one line for the metadata")
    parser.add_argument("--labels", help="allowed labels of a classifier, e.g. 0,1 (default: its classes_)")
    parser.add_argument("--score-range", help="lo,hi of the score (default 0,1 for classifiers with predict_proba)")
    parser.add_argument("--force", action="store_true", help="replace an existing version folder")
    args = parser.parse_args(argv)
    try:
        meta = register_version(
            args.model_dir, args.model, args.version, args.artifact, args.kind,
            features=_names(args.features, "--features"), stage=args.stage, eval_csv=args.eval_csv,
            label_column=args.label_column, description=args.description,
            labels=_numbers(args.labels, "--labels"), score_range=_numbers(args.score_range, "--score-range", 2),
            force=args.force,
        )
    except RegistrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2, sort_keys=True))
    print(f"registered {args.model}/{args.version} (stage {meta['stage']}) in {args.model_dir / args.model / args.version}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
