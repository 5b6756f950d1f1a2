"""The decision policy: what the judge tests, per metric, and with which error rates.

`canary.spec` builds a :class:`Policy` from the rollout spec (Contract 3); the judge, the benchmarks and the
tests all take this one object. Everything here is a frozen dataclass so a policy can be hashed, compared and
shown in a decision record; :meth:`Policy.to_dict` / :meth:`Policy.from_dict` round-trip it through JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from canary.vocabulary import DIRECTIONS, KINDS, LABEL_SOURCES, SOURCES

MARGIN_TYPES = ("absolute", "relative")
SPENDING = ("pocock", "obrien_fleming", "hsd")
ON_INCONCLUSIVE = ("rollback", "pause")


class PolicyError(ValueError):
    """A policy value is out of range; the message names the field, the value and the fix."""


def _check(cond: bool, where: str, value: Any, fix: str) -> None:
    if not cond:
        raise PolicyError(f"{where}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class MetricPolicy:
    """One guardrail metric compared between the stable and the canary arm.

    :param name: metric name as in the spec (also the DataFrame column for per-request observations).
    :param source: where the per-request value comes from (Contract 3), e.g. ``error`` or ``mismatch``.
    :param kind: ``binary`` (0/1 per request), ``continuous`` or ``latency_threshold`` (share of requests
        whose latency exceeds ``threshold``; tested as a binary metric so repeated looks stay valid).
    :param direction: ``decrease`` when lower is better (error rates, latency), ``increase`` otherwise.
    :param margin: non-inferiority margin (>= 0): how much worse the canary may be and still be promoted.
    :param margin_type: ``absolute`` (same unit as the metric) or ``relative`` (fraction of stable's mean).
    :param critical: a critical metric rolls back on its own share of alpha even if others look fine.
    :param label_delay_s: seconds a label needs to arrive; only predictions older than this at the look
        time are counted, on both arms alike.
    :param threshold: for ``latency_threshold``: milliseconds, or ``"baseline_p95"`` (stable's p95 over
        the reference window before the rollout); ``None`` for other kinds.
    """

    name: str
    source: str
    kind: str = "binary"
    direction: str = "decrease"
    margin: float = 0.0
    margin_type: str = "absolute"
    critical: bool = False
    label_delay_s: float = 0.0
    threshold: float | str | None = None

    def __post_init__(self) -> None:
        w = f"metric {self.name!r}"
        _check(bool(self.name), f"{w}.name", self.name, "give the metric a non-empty name")
        _check(self.source in SOURCES, f"{w}.source", self.source, f"use one of {', '.join(SOURCES)}")
        _check(self.kind in KINDS, f"{w}.kind", self.kind, f"use one of {', '.join(KINDS)}")
        _check(self.direction in DIRECTIONS, f"{w}.direction", self.direction, "use decrease or increase")
        _check(self.margin_type in MARGIN_TYPES, f"{w}.margin_type", self.margin_type, "use absolute or relative")
        _check(self.margin >= 0, f"{w}.margin", self.margin, "use a margin >= 0")
        _check(self.label_delay_s >= 0, f"{w}.label_delay_s", self.label_delay_s, "use a delay >= 0 seconds")
        if self.kind == "latency_threshold":
            ok = self.threshold == "baseline_p95" or (
                isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool) and self.threshold > 0
            )
            _check(ok, f"{w}.threshold", self.threshold, "use milliseconds > 0 or 'baseline_p95'")
            _check(self.source == "latency_ms", f"{w}.source", self.source, "latency_threshold needs source latency_ms")

    @property
    def needs_labels(self) -> bool:
        """True when the metric is computed from feedback labels (and honours ``label_delay_s``)."""
        return self.source in LABEL_SOURCES

    @property
    def sign(self) -> float:
        """+1 when a larger value is harm (direction ``decrease``), -1 otherwise."""
        return 1.0 if self.direction == "decrease" else -1.0


@dataclass(frozen=True)
class Policy:
    """How the judge decides, built from the spec by ``canary.spec.RolloutSpec.policy()``.

    :param metrics: the guardrail metrics.
    :param alpha_rollback: family-wise rate of rolling back a harmless canary over all looks and metrics;
        split equally across metrics (each metric, critical or not, can roll back on its share).
    :param alpha_promotion: rate of promoting a canary that is worse than a margin (per metric; promotion
        needs every metric non-inferior, an intersection of tests, so no split).
    :param srm_alpha: sample-ratio-mismatch chi-square level; a mismatch blocks promotion.
    :param circuit_breaker_enabled: run the always-valid circuit breaker between and at looks.
    :param circuit_breaker_alpha: its error rate (always valid over continuous monitoring).
    :param on_inconclusive: what the caller does at the extend cap: ``rollback`` or ``pause``.
    :param planned_canary_samples: canary samples per metric at which the information fraction reaches 1
        (from the power plan); ``None`` falls back to ``look index / planned_looks``.
    :param planned_looks: number of planned looks (one per step) used when no sample plan is given.
    :param rollback_spending: Lan-DeMets spending for harm: ``pocock``, ``obrien_fleming`` or ``hsd``.
    :param promotion_spending: spending for the non-inferiority tests (default O'Brien-Fleming-type).
    :param hsd_gamma: the Hwang-Shih-DeCani parameter when a spending is ``hsd``.
    :param min_clusters: fewest time clusters per arm before a metric is tested at all (summed over steps).
    :param cluster_seconds: width of a time cluster in seconds. The cluster-robust variance of the difference
        treats each (step, cluster) as one cluster holding both arms' requests of that time, aligned to the
        epoch (cluster id = epoch seconds // width).
        60 (one per minute) suits holds of minutes to hours; high traffic or holds of seconds need a shorter
        width, or every step must hold ``min_clusters`` minutes before anything is tested, and with G clusters
        a cell has only G - 1 degrees of freedom. It must divide 3600, so clusters line up with whole minutes
        and hours (the decision record and the log then agree on where a cluster starts) and one hour is a
        whole number of clusters.
    :param min_samples: fewest observations per arm before a metric is tested at all.
    :param expected_canary_share: expected canary share per step index (percent / 100) for SRM; when
        empty the judge takes the ``percent`` recorded with the observations.
    """

    metrics: tuple[MetricPolicy, ...]
    alpha_rollback: float = 0.05
    alpha_promotion: float = 0.05
    srm_alpha: float = 0.001
    circuit_breaker_enabled: bool = True
    circuit_breaker_alpha: float = 0.001
    on_inconclusive: str = "rollback"
    planned_canary_samples: int | None = None
    planned_looks: int = 4
    rollback_spending: str = "pocock"
    promotion_spending: str = "obrien_fleming"
    hsd_gamma: float = -2.0
    min_clusters: int = 3
    cluster_seconds: int = 60
    min_samples: int = 30
    expected_canary_share: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "expected_canary_share", tuple(self.expected_canary_share))
        _check(len(self.metrics) > 0, "policy.metrics", self.metrics, "list at least one metric")
        names = [m.name for m in self.metrics]
        _check(len(set(names)) == len(names), "policy.metrics", names, "give every metric a unique name")
        for f in ("alpha_rollback", "alpha_promotion", "srm_alpha", "circuit_breaker_alpha"):
            v = getattr(self, f)
            _check(0 < v < 0.5, f"policy.{f}", v, "use a level between 0 and 0.5, e.g. 0.05")
        _check(self.on_inconclusive in ON_INCONCLUSIVE, "policy.on_inconclusive", self.on_inconclusive,
               "use rollback or pause")
        for f in ("rollback_spending", "promotion_spending"):
            _check(getattr(self, f) in SPENDING, f"policy.{f}", getattr(self, f), f"use one of {', '.join(SPENDING)}")
        _check(self.planned_looks >= 1, "policy.planned_looks", self.planned_looks, "use at least 1 look")
        _check(self.planned_canary_samples is None or self.planned_canary_samples > 0,
               "policy.planned_canary_samples", self.planned_canary_samples, "use a positive count or null")
        _check(self.min_clusters >= 2, "policy.min_clusters", self.min_clusters, "use at least 2 clusters")
        w = self.cluster_seconds
        _check(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 3600 and 3600 % w == 0,
               "policy.cluster_seconds", w,
               "use a whole number of seconds that divides 3600, e.g. 1, 5, 10, 15, 30, 60 (the default) or 300")

    @property
    def cluster_label(self) -> str:
        """The cluster width in words, for notes and records: ``"1-minute"``, ``"10-second"``."""
        w = self.cluster_seconds
        return f"{w // 60}-minute" if w % 60 == 0 else f"{w}-second"

    def metric(self, name: str) -> MetricPolicy:
        """The metric policy called ``name`` (KeyError naming the known metrics otherwise)."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r} in the policy; known: {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for XCom and the decision record)."""
        d = asdict(self)
        d["metrics"] = [asdict(m) for m in self.metrics]
        d["expected_canary_share"] = list(self.expected_canary_share)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["metrics"] = tuple(MetricPolicy(**m) for m in d["metrics"])
        d["expected_canary_share"] = tuple(d.get("expected_canary_share", ()))
        return cls(**d)
