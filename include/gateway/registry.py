"""The model directory: one folder per version with `model.joblib` and `metadata.json` (Contract 1).

The directory is the registry: `GET /v1/models` rescans it, `PUT .../stage` rewrites a version's metadata file
atomically. Artifacts are joblib pickles, so the directory must be trusted like code (only admins write to it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.names import is_valid_name

log = logging.getLogger("gateway.registry")

STAGES = ("production", "candidate", "archived")
KINDS = ("classifier", "regressor")
ARTIFACT = "model.joblib"
METADATA = "metadata.json"
ARTIFACT_CHECK_SECONDS = 2.0  # a replaced model.joblib is picked up within this time


class UnknownModel(LookupError):
    """No folder for this model in the model directory."""


class UnknownVersion(LookupError):
    """No folder for this version of the model."""


class UnloadableVersion(RuntimeError):
    """The version exists but its metadata or artifact cannot be used."""


class BadFeatures(ValueError):
    """The request's features do not fit the model (missing names or non-numeric values)."""


def check_metadata(meta: object, model: str, version: str) -> dict:
    """Validate a metadata dict against Contract 1; raise `UnloadableVersion` naming the bad field."""
    where = f"{model}/{version}/{METADATA}"
    if not isinstance(meta, dict):
        raise UnloadableVersion(f"{where}: must hold a JSON object")
    if meta.get("model") != model or meta.get("version") != version:
        raise UnloadableVersion(
            f"{where}: model={meta.get('model')!r} version={meta.get('version')!r} must match the folder names "
            f"{model!r}/{version!r}"
        )
    if meta.get("kind") not in KINDS:
        raise UnloadableVersion(f"{where}: kind={meta.get('kind')!r} must be one of {list(KINDS)}")
    features = meta.get("features")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) and f for f in features):
        raise UnloadableVersion(f"{where}: features must be a non-empty list of feature names in model order")
    if len(set(features)) != len(features):
        raise UnloadableVersion(f"{where}: features has duplicate names")
    if meta.get("stage") not in STAGES:
        raise UnloadableVersion(f"{where}: stage={meta.get('stage')!r} must be one of {list(STAGES)}")
    return meta


@dataclass
class LoadedModel:
    """A loaded artifact with the adapter that turns a features dict into `(prediction, score)`.

    :param model: model name.
    :param version: version name.
    :param kind: `classifier` or `regressor`.
    :param features: feature names in the order the estimator expects.
    :param estimator: the unpickled object (scikit-learn estimator, pipeline or wrapper).
    """

    model: str
    version: str
    kind: str
    features: list[str]
    estimator: Any
    _positive_index: int = 1
    _use_frame: bool = False
    call_ms_ewma: float | None = None

    def observe(self, seconds: float) -> None:
        """Record one call's duration (exponentially weighted mean, for the inline-or-thread decision)."""
        ms = seconds * 1000.0
        self.call_ms_ewma = ms if self.call_ms_ewma is None else 0.9 * self.call_ms_ewma + 0.1 * ms

    def is_fast(self, threshold_ms: float) -> bool:
        """True when the model's calls usually take less than `threshold_ms` (then it runs on the event loop)."""
        return self.call_ms_ewma is not None and self.call_ms_ewma < threshold_ms

    def __post_init__(self) -> None:
        self._use_frame = hasattr(self.estimator, "feature_names_in_")
        classes = getattr(self.estimator, "classes_", None)
        if self.kind == "classifier":
            if not hasattr(self.estimator, "predict_proba") and not hasattr(self.estimator, "predict"):
                raise UnloadableVersion(
                    f"{self.model}/{self.version}: classifier has no predict_proba/predict"
                )
            self._positive_index = len(classes) - 1 if classes is not None and len(classes) else 1
            if classes is not None and not all(_is_number(c) for c in classes):
                # the log stores predictions and labels as numbers: a text class would be logged as NULL and
                # every label metric of this model would silently have no data
                raise UnloadableVersion(
                    f"{self.model}/{self.version}: classifier classes_ {list(classes)[:5]} are not numbers; "
                    "the prediction log stores numeric predictions and labels: retrain with numeric labels "
                    "(e.g. 0/1) or wrap the model so predict returns numbers"
                )
        elif not hasattr(self.estimator, "predict"):
            raise UnloadableVersion(f"{self.model}/{self.version}: regressor has no predict method")

    def row(self, features: dict[str, Any]) -> list[float]:
        """The feature values in model order as floats (None becomes NaN); raise `BadFeatures` naming problems."""
        if not isinstance(features, dict):
            raise BadFeatures("features must be a JSON object {name: number}")
        missing = [name for name in self.features if name not in features]
        if missing:
            raise BadFeatures(f"missing feature(s) {missing}; this version needs {self.features}")
        values: list[float] = []
        for name in self.features:
            value = features[name]
            if value is None:
                values.append(math.nan)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                values.append(float(value))
            else:
                raise BadFeatures(f"feature {name!r}={value!r} is not a number; send a number or null")
        return values

    def predict(self, values: list[float]) -> tuple[Any, float | None]:
        """Call the estimator on one row; return `(prediction, score)` per Contract 1."""
        if self._use_frame:
            import pandas as pd

            x: Any = pd.DataFrame([values], columns=self.features)
        else:
            import numpy as np

            x = np.asarray([values], dtype=float)
        if self.kind == "regressor":
            return _plain(self.estimator.predict(x)[0]), None
        if hasattr(self.estimator, "predict_proba"):
            proba = self.estimator.predict_proba(x)[0]
            score = float(proba[self._positive_index])
            classes = getattr(self.estimator, "classes_", None)
            best = 0 if score != score else int(max(range(len(proba)), key=lambda i: proba[i]))
            label = classes[best] if classes is not None else best
            return _plain(label), score
        return _plain(self.estimator.predict(x)[0]), None


def _is_number(value: Any) -> bool:
    """True for Python and numpy ints, floats and booleans (a bool is an int: stored as 0/1); False for text.
    Also used by ``gateway.register``, so registering and loading agree on what a numeric class is."""
    return isinstance(_plain(value), int | float)


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    return value


@dataclass
class VersionEntry:
    """One version folder: its metadata and (lazily) its loaded artifact."""

    model: str
    version: str
    path: Path
    metadata: dict | None = None
    meta_error: str | None = None
    load_error: str | None = None
    loaded: LoadedModel | None = None
    loaded_mtime: float | None = None
    checked_at: float = float("-inf")
    meta_mtime: float | None = None

    def describe(self) -> dict:
        """The version entry of `GET /v1/models` (Contract 1)."""
        meta = self.metadata or {}
        out = {
            "version": self.version,
            "stage": meta.get("stage"),
            "created_at": meta.get("created_at"),
            "kind": meta.get("kind"),
            "features": meta.get("features"),
            "params": meta.get("params"),
            "training_data": meta.get("training_data"),
            "eval_metrics": meta.get("eval_metrics"),
            "labels": meta.get("labels"),
            "score_range": meta.get("score_range"),
            "loadable": self.error is None and self.loaded is not None,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def error(self) -> str | None:
        """Why the version cannot be used (bad metadata or a failed load), or None."""
        return self.meta_error or self.load_error


@dataclass
class ModelRegistry:
    """The model directory, scanned on demand and loaded lazily (thread-safe).

    :param root: the model directory (`<root>/<model>/<version>/`).
    """

    root: Path
    _entries: dict[str, dict[str, VersionEntry]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _last_scan: float = float("-inf")

    def scan(self) -> None:
        """Re-read the directory: new versions appear, removed ones vanish, changed metadata is re-read."""
        found: dict[str, dict[str, VersionEntry]] = {}
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"model directory {self.root} does not exist; create it or pass --model-dir"
            )
        with self._lock:
            self._last_scan = time.monotonic()
            for model_dir in sorted(self.root.iterdir()):
                if not model_dir.is_dir() or not is_valid_name(model_dir.name):
                    continue
                versions: dict[str, VersionEntry] = {}
                for version_dir in sorted(model_dir.iterdir()):
                    if not version_dir.is_dir() or not is_valid_name(version_dir.name):
                        continue
                    if not (version_dir / METADATA).is_file():
                        continue
                    old = self._entries.get(model_dir.name, {}).get(version_dir.name)
                    entry = old or VersionEntry(model_dir.name, version_dir.name, version_dir)
                    self._read_metadata(entry)
                    versions[version_dir.name] = entry
                if versions:
                    found[model_dir.name] = versions
            self._entries = found

    def _read_metadata(self, entry: VersionEntry) -> None:
        meta_path = entry.path / METADATA
        try:
            mtime = meta_path.stat().st_mtime
            if entry.meta_mtime == mtime and entry.metadata is not None:
                return
            entry.metadata = check_metadata(json.loads(meta_path.read_text()), entry.model, entry.version)
            entry.meta_mtime, entry.meta_error = mtime, None
        except (OSError, ValueError, UnloadableVersion) as exc:
            entry.metadata, entry.meta_error, entry.loaded = (
                None,
                f"{entry.model}/{entry.version}: {exc}",
                None,
            )

    def models(self) -> list[str]:
        """Model names, sorted."""
        with self._lock:
            return sorted(self._entries)

    def has_model(self, model: str) -> bool:
        """True when the model has at least one version folder (rescans when not found, at most once a second,
        so requests for unknown models cannot keep the gateway busy listing directories)."""
        with self._lock:
            if model in self._entries:
                return True
            if time.monotonic() - self._last_scan < 1.0:
                return False
        self.scan()
        with self._lock:
            return model in self._entries

    def entries(self, model: str) -> list[VersionEntry]:
        """All version entries of a model; raise `UnknownModel`."""
        with self._lock:
            if model not in self._entries:
                raise UnknownModel(f"unknown model {model!r}; known models: {sorted(self._entries)}")
            return list(self._entries[model].values())

    def entry(self, model: str, version: str) -> VersionEntry:
        """One version entry; raise `UnknownModel` / `UnknownVersion`."""
        with self._lock:
            versions = self._entries.get(model)
            if versions is None:
                raise UnknownModel(f"unknown model {model!r}; known models: {sorted(self._entries)}")
            if version not in versions:
                self.scan()
                versions = self._entries.get(model, {})
            if version not in versions:
                raise UnknownVersion(
                    f"unknown version {version!r} of model {model!r}; known: {sorted(versions)}"
                )
            return versions[version]

    def load(self, model: str, version: str) -> LoadedModel:
        """The loaded version (cached until its artifact changes); raise `UnloadableVersion` with the reason."""
        entry = self.entry(model, version)
        now = time.monotonic()
        if entry.loaded is not None and now - entry.checked_at < ARTIFACT_CHECK_SECONDS:
            return entry.loaded  # hot path: no filesystem call (a stat releases the GIL and costs a hand-off)
        with self._lock:
            entry.checked_at = now
            artifact = entry.path / ARTIFACT
            try:
                mtime = artifact.stat().st_mtime
            except OSError:
                entry.loaded, entry.load_error = None, f"{model}/{version}: {ARTIFACT} is missing"
                raise UnloadableVersion(entry.load_error) from None
            if entry.loaded is not None and entry.loaded_mtime == mtime:
                return entry.loaded
            if entry.metadata is None:
                raise UnloadableVersion(entry.meta_error or f"{model}/{version}: metadata is not valid")
            try:
                import joblib

                estimator = joblib.load(artifact)
                loaded = LoadedModel(
                    model, version, entry.metadata["kind"], list(entry.metadata["features"]), estimator
                )
            except Exception as exc:  # noqa: BLE001 - any unpickling failure makes the version unloadable
                entry.loaded, entry.load_error = None, f"{model}/{version}: cannot load {ARTIFACT}: {exc!r}"
                log.warning("version not loadable: %s", entry.load_error)
                raise UnloadableVersion(entry.load_error) from exc
            entry.loaded, entry.loaded_mtime, entry.load_error = loaded, mtime, None
            return loaded

    def try_load(self, model: str, version: str) -> None:
        """Attempt a load so `loadable`/`error` reflect reality; never raises for load failures."""
        try:
            self.load(model, version)
        except UnloadableVersion:
            pass

    def production_version(self, model: str) -> str | None:
        """The version whose stage is `production` (the newest by created_at when several claim it)."""
        prod = [e for e in self.entries(model) if e.metadata and e.metadata.get("stage") == "production"]
        if not prod:
            return None
        prod.sort(key=lambda e: (str(e.metadata.get("created_at", "")), e.version))  # type: ignore[union-attr]
        return prod[-1].version

    def set_stage(self, model: str, version: str, stage: str) -> dict:
        """Write the stage into the version's metadata file; `production` archives the previous production."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}: must be one of {list(STAGES)}")
        with self._lock:
            target = self.entry(model, version)
            if target.metadata is None:
                raise UnloadableVersion(target.meta_error or f"{model}/{version}: metadata is not valid")
            if stage == "production":
                for other in self.entries(model):
                    if (
                        other.version != version
                        and other.metadata
                        and other.metadata.get("stage") == "production"
                    ):
                        self._write_metadata(other, {**other.metadata, "stage": "archived"})
            self._write_metadata(target, {**target.metadata, "stage": stage})
            return target.describe()

    def _write_metadata(self, entry: VersionEntry, meta: dict) -> None:
        path = entry.path / METADATA
        fd, tmp = tempfile.mkstemp(dir=entry.path, prefix=".metadata-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
        entry.metadata = meta
        entry.meta_mtime = path.stat().st_mtime
