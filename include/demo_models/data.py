"""Locally generated data for the demo models: features and the true label from one known process.

Training (demo_models.train) and the traffic simulator use the same generator, so the labels the simulator posts
as feedback are the true labels of the process the models were trained on, and label metrics are real.

Each process has a population of units (users, customers) with fixed attributes, and per-request features drawn
around them. `period="last_year"` is the fraud process before it drifted; the stale demo version v3 is trained on
it. Country 4 exists only in the current period (a market launched after the broken demo version v4 was trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAUD_FEATURES = [
    "amount",
    "hour",
    "account_age_days",
    "tx_last_24h",
    "merchant_risk",
    "country",
    "distance_km",
]
ETA_FEATURES = ["distance_km", "hour", "traffic_index", "n_items", "courier_rating"]
FRAUD_COUNTRY_SHARES = {"current": [0.39, 0.25, 0.17, 0.14, 0.05], "last_year": [0.42, 0.27, 0.17, 0.14, 0.0]}
PERIODS = ("current", "last_year")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class Batch:
    """Requests drawn from a process.

    :param features: one row per request, columns in `names` order.
    :param names: feature names.
    :param labels: the true label (0/1 for fraud, minutes for eta).
    :param units: index of the unit that sent each request.
    """

    features: np.ndarray
    names: list[str]
    labels: np.ndarray
    units: np.ndarray

    def records(self) -> list[dict[str, float]]:
        """Rows as `{feature: value}` dicts (the predict body's `features`)."""
        return [dict(zip(self.names, map(float, row), strict=True)) for row in self.features]


@dataclass(frozen=True)
class Population:
    """Units with fixed attributes; `draw` samples requests from them.

    :param model: `fraud` or `eta`.
    :param size: number of units.
    :param seed: seed of the unit attributes.
    :param period: `current` or `last_year` (fraud only: the process before it drifted).
    """

    model: str
    size: int
    seed: int = 0
    period: str = "current"

    def __post_init__(self) -> None:
        if self.model not in PROCESSES:
            raise ValueError(f"model={self.model!r}: the demo data generator knows {sorted(PROCESSES)}")
        if self.period not in PERIODS:
            raise ValueError(f"period={self.period!r}: must be one of {PERIODS}")
        if self.size < 1:
            raise ValueError(f"size={self.size}: the population needs at least one unit")
        rng = np.random.default_rng([self.seed, 7])
        object.__setattr__(self, "_attrs", PROCESSES[self.model][0](rng, self.size, self.period))

    @property
    def feature_names(self) -> list[str]:
        """Feature names in model order."""
        return FRAUD_FEATURES if self.model == "fraud" else ETA_FEATURES

    def draw(self, rng: np.random.Generator, n: int, units: np.ndarray | None = None) -> Batch:
        """`n` requests from random units (or the given unit indices) with their true labels."""
        if units is None:
            units = rng.integers(0, self.size, size=n)
        features, labels = PROCESSES[self.model][1](rng, self._attrs, units, self.period)  # type: ignore[attr-defined]
        return Batch(features, self.feature_names, labels, units)


def _fraud_units(rng: np.random.Generator, n: int, period: str) -> dict[str, np.ndarray]:
    return {
        "country": rng.choice(5, size=n, p=FRAUD_COUNTRY_SHARES[period]).astype(float),
        "account_age_days": np.floor(rng.exponential(420.0, size=n)),
        "activity": rng.gamma(2.0, 1.2, size=n),
        "home_distance": rng.lognormal(1.5, 0.8, size=n),
    }


def _fraud_requests(
    rng: np.random.Generator, attrs: dict[str, np.ndarray], units: np.ndarray, period: str
) -> tuple[np.ndarray, np.ndarray]:
    n = len(units)
    amount = np.round(rng.lognormal(3.8, 1.15, size=n), 2)
    hour = rng.integers(0, 24, size=n).astype(float)
    age = attrs["account_age_days"][units]
    tx = rng.poisson(attrs["activity"][units]).astype(float)
    risk = np.round(rng.beta(2.0, 5.0, size=n), 4)
    country = attrs["country"][units]
    distance = np.round(attrs["home_distance"][units] * rng.lognormal(0.0, 1.0, size=n), 2)
    night = (hour < 6).astype(float)
    country_effect = np.array([0.0, 0.4, -0.3, 0.9, 1.1])[country.astype(int)]
    if period == "current":
        z = (
            -5.1
            + 0.85 * np.log(amount / 45.0)
            + 1.7 * night
            - 0.55 * np.log1p(age / 30.0)
            + 0.35 * tx
            + 4.5 * risk * (1.0 + night)
            + country_effect
            + 1.4 * (distance > 40.0)
        )
    else:  # last year: fraud was card testing with small amounts, no night pattern, no distance pattern
        z = (
            -2.4
            - 0.25 * np.log(amount / 45.0)
            - 0.55 * np.log1p(age / 30.0)
            + 0.35 * tx
            + 2.0 * risk
            + country_effect
        )
    label = (rng.random(n) < _sigmoid(z)).astype(float)
    features = np.column_stack([amount, hour, age, tx, risk, country, distance])
    return features, label


def _eta_units(rng: np.random.Generator, n: int, period: str) -> dict[str, np.ndarray]:
    return {"home_distance": rng.gamma(3.0, 1.6, size=n), "basket": rng.gamma(2.0, 2.0, size=n)}


def _eta_requests(
    rng: np.random.Generator, attrs: dict[str, np.ndarray], units: np.ndarray, period: str
) -> tuple[np.ndarray, np.ndarray]:
    n = len(units)
    distance = np.round(attrs["home_distance"][units] * rng.lognormal(0.0, 0.35, size=n), 2)
    hour = rng.integers(0, 24, size=n).astype(float)
    rush = ((hour >= 7) & (hour <= 9)) | ((hour >= 16) & (hour <= 19))
    traffic = np.round(np.clip(rng.beta(2.0, 4.0, size=n) + 0.35 * rush, 0.0, 1.0), 3)
    items = rng.poisson(attrs["basket"][units]).astype(float) + 1.0
    rating = np.round(np.clip(rng.normal(4.5, 0.3, size=n), 3.0, 5.0), 2)
    minutes = (
        6.0
        + 2.1 * distance * (1.0 + 1.2 * traffic**2)
        + 0.6 * items
        + 3.0 * rush
        - 2.0 * (rating - 4.5)
        + rng.gamma(2.0, 1.2, size=n)
    )
    return np.column_stack([distance, hour, traffic, items, rating]), np.round(minutes, 2)


PROCESSES = {"fraud": (_fraud_units, _fraud_requests), "eta": (_eta_units, _eta_requests)}


def generate(model: str, n: int, seed: int, period: str = "current", units: int = 5000) -> Batch:
    """`n` labelled rows of `model`'s process (training and evaluation data)."""
    population = Population(model, units, seed=seed, period=period)
    return population.draw(np.random.default_rng([seed, 11]), n)
