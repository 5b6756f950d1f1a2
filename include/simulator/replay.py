"""Replay rows of a CSV file as predict requests (and their labels as feedback), for models nobody here wrote.

The demo mode draws requests from `demo_models.data`, which only knows `fraud` and `eta`. Replay mode takes
the requests from your own data instead: one request per row, in file order, looping when the rows run out.
The feature values are taken by name from the columns the model's registered versions need (asked from the
gateway, `GET /v1/models`, so a candidate with an extra feature gets it too); a missing column is an error that
names it. The unit id is the row's value in the unit column, or a stable hash of the row index (so a row keeps
its arm when the file loops). The label column, when given, is posted as feedback `label_delay` seconds
after the answer; empty labels send no feedback.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests

#: Stages whose versions may serve traffic during a rollout (archived versions are ignored).
SERVING_STAGES = ("production", "candidate")
MAX_UNIT_ID_LENGTH = 256  # the gateway's limit (gateway.names.MAX_UNIT_ID_LENGTH)


def model_features(url: str, model: str, timeout: float = 10.0) -> dict[str, list[str]]:
    """`{version: features}` of the model's production and candidate versions, from `GET /v1/models`.

    Falls back to every version with metadata when none is in those stages. Raises ValueError naming the model
    and the fix when the gateway does not know it.
    """
    try:
        response = requests.get(f"{url}/v1/models", timeout=timeout)
        response.raise_for_status()
        listing = response.json()["models"]
    except (requests.RequestException, ValueError, KeyError) as exc:
        raise ValueError(f"url={url!r}: cannot list the gateway's models (GET /v1/models: {exc}); start the "
                         "gateway first and check --url") from exc
    entry = next((m for m in listing if m.get("model") == model), None)
    if entry is None:
        raise ValueError(
            f"model={model!r} is not registered at {url} (known: {sorted(m.get('model') for m in listing)}); "
            "register it with `python -m gateway.register --model-dir <the gateway's --model-dir> ...`"
        )
    versions = [v for v in entry.get("versions", []) if isinstance(v.get("features"), list)]
    serving = [v for v in versions if v.get("stage") in SERVING_STAGES] or versions
    if not serving:
        raise ValueError(f"model={model!r}: no version with readable metadata at {url}; see GET /v1/models errors")
    return {v["version"]: list(v["features"]) for v in serving}


class CsvReplay:
    """The rows of a CSV file as an endless stream of `(body, label, wants_feedback)` simulator jobs.

    :param path: the CSV file (header row with column names).
    :param features: `{version: feature names}` the requests must carry (see :func:`model_features`).
    :param label_column: column with the true label (numbers), or None for no feedback.
    :param unit_column: column with the unit id (user, account, ...), or None to hash the row index.
    """

    def __init__(self, path: str | Path, features: dict[str, list[str]], label_column: str | None = None,
                 unit_column: str | None = None) -> None:
        import pandas as pd

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"csv={str(path)!r}: no such file; pass the CSV to replay with --csv")
        try:
            frame = pd.read_csv(self.path)
        except Exception as exc:  # noqa: BLE001 - parser errors, encodings, empty files
            raise ValueError(f"csv={str(path)!r}: cannot read it as CSV ({exc})") from exc
        if frame.empty:
            raise ValueError(f"csv={str(path)!r}: has no rows to replay")
        names: list[str] = []
        for version_features in features.values():
            names.extend(f for f in version_features if f not in names)
        missing = {v: [f for f in fs if f not in frame.columns] for v, fs in features.items()}
        missing = {v: fs for v, fs in missing.items() if fs}
        if missing:
            raise ValueError(
                f"csv={str(path)!r}: missing feature column(s) "
                f"{sorted({f for fs in missing.values() for f in fs})} needed by version(s) "
                f"{', '.join(f'{v} {fs}' for v, fs in sorted(missing.items()))}; the CSV has {list(frame.columns)}. "
                "Name the columns exactly like the model's features"
            )
        for option, column in (("--label-column", label_column), ("--unit-column", unit_column)):
            if column is not None and column not in frame.columns:
                raise ValueError(f"{option}={column!r}: no such column in {path}; it has {list(frame.columns)}")
        self.feature_names = names
        self.features = [self._numbers(frame, name, "feature") for name in names]
        self.labels = self._numbers(frame, label_column, "label") if label_column is not None else None
        self.units = self._units(frame, unit_column)
        self.rows = len(frame)

    def _numbers(self, frame: Any, column: str, what: str) -> list[float | None]:
        import pandas as pd

        series = frame[column]
        if pd.api.types.is_bool_dtype(series):
            series = series.astype(float)
        if not pd.api.types.is_numeric_dtype(series):
            example = series.dropna().iloc[0] if series.notna().any() else None
            raise ValueError(
                f"csv={str(self.path)!r}: {what} column {column!r} is not numeric (e.g. {example!r}); the gateway "
                "and the prediction log take numbers (or empty cells, sent as null): encode it as numbers"
            )
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                for v in series.astype(float).tolist()]

    def _units(self, frame: Any, column: str | None) -> list[str]:
        def from_index(i: int) -> str:
            return "row-" + hashlib.sha256(str(i).encode()).hexdigest()[:16]

        if column is None:
            return [from_index(i) for i in range(len(frame))]
        units = []
        for i, value in enumerate(frame[column].tolist()):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                units.append(from_index(i))
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            text = str(value)
            if len(text) > MAX_UNIT_ID_LENGTH:
                raise ValueError(f"csv={str(self.path)!r}: unit id in row {i} of column {column!r} is longer than "
                                 f"{MAX_UNIT_ID_LENGTH} characters; use a shorter id")
            units.append(text)
        return units

    def jobs(self, rng: np.random.Generator, feedback_share: float) -> Iterator[tuple[dict, float | None, bool]]:
        """Rows in file order, forever; a row gets feedback when it has a label and draws under the share."""
        names = self.feature_names
        while True:
            draws = rng.random(self.rows)
            for i in range(self.rows):
                body = {"unit_id": self.units[i],
                        "features": {name: column[i] for name, column in zip(names, self.features, strict=True)}}
                label = self.labels[i] if self.labels is not None else None
                yield body, label, label is not None and bool(draws[i] < feedback_share)
