"""Model wrappers pickled into the demo artifacts (importable by the gateway: `include/` is on its path).

`FraudModelV4` carries real production-only defects on purpose, for the rollout demo. Offline evaluation on its
training distribution cannot see them:

- its country encoder was fitted before country 4 launched and raises on it (HTTP 500, `status="error"`);
- its amount recalibration takes `log(amount_cap - amount)`; amounts above the cap (clipped away in its
  training data) give NaN scores;
- it calls a (simulated) remote feature store on every request, which adds `lookup_delay_s` of latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FraudModelV4:
    """A fraud classifier with a country check, an amount recalibration and a feature-store lookup.

    :param estimator: fitted binary classifier (predict_proba, classes_ [0, 1]).
    :param known_countries: country codes the encoder was fitted on.
    :param amount_cap: largest amount seen in training; above it the recalibration is undefined.
    :param amount_slope: strength of the recalibration (small: it barely moves in-range scores).
    :param lookup_delay_s: latency of the simulated feature-store call per request.
    :param country_index: column of `country` in the feature row.
    :param amount_index: column of `amount` in the feature row.
    """

    estimator: Any
    known_countries: tuple[float, ...]
    amount_cap: float
    amount_slope: float = 0.05
    lookup_delay_s: float = 0.006
    country_index: int = 5
    amount_index: int = 0

    @property
    def classes_(self) -> np.ndarray:
        """Class labels, as scikit-learn estimators expose them."""
        return self.estimator.classes_

    def _lookup_features(self, n_rows: int) -> None:
        """Stand-in for the synchronous feature-store round trip this version added."""
        time.sleep(self.lookup_delay_s)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities; raises on an unknown country, NaN for amounts above the cap."""
        x = np.asarray(x, dtype=float)
        self._lookup_features(len(x))
        unknown = ~np.isin(x[:, self.country_index], self.known_countries)
        if unknown.any():
            raise ValueError(
                f"country encoder: unknown category {x[unknown, self.country_index][0]:g}; fitted on "
                f"{list(self.known_countries)}"
            )
        p = np.clip(self.estimator.predict_proba(x)[:, 1], 1e-6, 1 - 1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = self.amount_slope * (
                np.log(self.amount_cap - x[:, self.amount_index]) - np.log(self.amount_cap)
            )
            score = 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + shift)))
        return np.column_stack([1.0 - score, score])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class labels at threshold 0.5 (NaN scores give class 0)."""
        return (self.predict_proba(x)[:, 1] >= 0.5).astype(float)
