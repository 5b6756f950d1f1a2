"""Rollout specs: load a YAML file, merge the trigger params, validate both, return frozen dataclasses.

One spec per model lives in ``include/rollouts/<model>.yaml`` and becomes the DAG ``canary_rollout__<model>``.
:func:`load_spec` reports *every* problem at once in one :class:`SpecError`; each problem names the file,
the field path, the bad value and the fix. Unknown keys are errors (with a did-you-mean suggestion), so a
typo can never silently fall back to a default.

This module is imported at DAG parse time: it imports only the standard library and PyYAML (the judge's
policy classes are imported inside :meth:`RolloutSpec.policy`). The field reference is ``docs/spec.md``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from canary.vocabulary import DIRECTIONS, KINDS, LABEL_SOURCES, SOURCES

__all__ = [
    "SpecError",
    "Problem",
    "RolloutSpec",
    "Connections",
    "Hold",
    "Clusters",
    "Metric",
    "Alpha",
    "Srm",
    "CircuitBreaker",
    "DataQuality",
    "Drift",
    "PostDeploy",
    "Notifications",
    "load_spec",
    "parse_spec",
    "spec_from_dict",
    "parse_duration",
    "format_duration",
    "NAME_RE",
    "PARAM_KEYS",
    "DEFAULTS",
]

#: Model and version names (Contract 1): they become DAG ids, URL segments and paths.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Metric names become DataFrame columns and SQL aliases: lower-case identifiers only.
METRIC_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: Airflow connection ids.
#: Feature names (drift.features): read from the logged features JSON by name.
FEATURE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
CONN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_.:/ -]{1,100}$")
EMAIL_RE = re.compile(r"^[^@\s,;]+@[^@\s,;]+\.[^@\s,;]+$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: Which sources make sense for which kind (a 0/1 kind needs a 0/1 source, and so on).
KIND_SOURCES = {
    "binary": ("error", "null_score", "mismatch", "label", "prediction"),
    "continuous": ("latency_ms", "score", "prediction", "label", "abs_error", "squared_error"),
    "latency_threshold": ("latency_ms",),
}
MARGIN_TYPES = ("absolute", "relative")
ON_INCONCLUSIVE = ("rollback", "pause")
SCHEDULE_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")

#: The trigger form's fields (DAG params); anything else in the run conf is an error.
PARAM_KEYS = ("candidate", "steps", "hold_min_duration", "hold_min_samples", "hold_max_wait", "margins")

#: The defaults a team can start from (documented in docs/spec.md). Durations in seconds.
DEFAULTS: dict[str, Any] = {
    "description": "",
    "owner": "airflow",
    "connections": {"router": "canary_gateway", "prediction_log": "canary_prediction_log"},
    "steps": [1, 5, 25, 50],
    "hold": {"min_duration": 600, "min_samples": 500, "max_wait": 7200, "poll_interval": 30},
    "clusters": {"width": 60, "min_per_arm": 3},
    "lease": 900,
    "deadline": 86400,
    "metrics": [
        {
            "name": "error_rate",
            "source": "error",
            "kind": "binary",
            "direction": "decrease",
            "margin": 0.002,
            "margin_type": "absolute",
            "critical": True,
        },
        {
            "name": "latency_p95_exceed",
            "source": "latency_ms",
            "kind": "latency_threshold",
            "threshold": "baseline_p95",
            "direction": "decrease",
            "margin": 0.02,
            "margin_type": "absolute",
        },
    ],
    "alpha": {"rollback": 0.05, "promotion": 0.05},
    "srm": {"alpha": 0.001},
    "circuit_breaker": {"enabled": True, "alpha": 0.001},
    "on_inconclusive": "rollback",
    "data_quality": {"suite": None, "sample_size": 5000},
    "drift": {"features": "all", "bins": 10, "psi_floor": 0.1, "sample_size": 20000},
    "post_deploy": {"window": 600, "min_samples": 500},
    "schedule": None,
    "notifications": {"webhook_conn_id": None, "email": []},
    "tags": [],
}
METRIC_DEFAULTS: dict[str, Any] = {
    "direction": "decrease",
    "margin_type": "absolute",
    "critical": False,
    "threshold": None,
    "label_delay": 0,
}
METRIC_KEYS = (
    "name",
    "source",
    "kind",
    "direction",
    "margin",
    "margin_type",
    "critical",
    "threshold",
    "label_delay",
)
TOP_KEYS = ("model", *DEFAULTS.keys())


# --------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec or with the trigger params.

    :param file: the spec file (or ``"<file> (trigger params)"`` for the run conf).
    :param path: the field path, e.g. ``steps[2]`` or ``metrics[0].kind`` (indexes 0-based).
    :param value: the bad value as written (``None`` when the field is missing).
    :param message: what is wrong.
    :param fix: how to fix it.
    """

    file: str
    path: str
    value: Any
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message} (got {_show(self.value)}). Fix: {self.fix}"


class SpecError(ValueError):
    """A spec or trigger conf is invalid. ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the rollout spec"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
_BAD: Any = object()  # a field that failed validation; the dataclass gets a placeholder


# ------------------------------------------------------------------------------------------ durations


def parse_duration(value: Any) -> int:
    """Seconds from an int number of seconds or a string ``"30s"``, ``"10m"``, ``"2h"``, ``"1d"``.

    Raises ``ValueError`` with the fix in the message.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is seconds or a string like '30s', '10m', '2h', '1d', not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        if value.strip().isdigit():
            return int(value.strip())
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            if seconds.is_integer():
                return int(seconds)
    raise ValueError("a duration is whole seconds (e.g. 600) or a string like '30s', '10m', '2h', '1d'")


def format_duration(seconds: int) -> str:
    """The shortest exact form: ``600`` -> ``"10m"``, ``90`` -> ``"90s"``."""
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Connections:
    """Airflow connection ids of the traffic router (gateway admin API) and of the prediction log (SQL)."""

    router: str = "canary_gateway"
    prediction_log: str = "canary_prediction_log"


@dataclass(frozen=True)
class Hold:
    """How long each traffic step holds before a look.

    :param min_duration: seconds the step runs at least (covers daily-cycle effects within a step).
    :param min_samples: requests per arm needed before the look (both arms).
    :param max_wait: cap in seconds: the look happens at the cap even if ``min_samples`` is not reached,
        and an ``extend`` verdict stops extending at the cap (then ``on_inconclusive`` applies).
    :param poll_interval: seconds between checks of the sample counts (and lease renewals).
    """

    min_duration: int = 600
    min_samples: int = 500
    max_wait: int = 7200
    poll_interval: int = 30


@dataclass(frozen=True)
class Clusters:
    """The time clusters of the judge's cluster-robust variance (``Policy.cluster_seconds`` and
    ``Policy.min_clusters``).

    :param width: seconds per cluster; divides 3600 (so clusters line up with whole minutes and hours).
        Noise that is shared by one arm's requests for a while (a busy replica, a burst of one kind of
        traffic) is absorbed only when it varies on a longer scale than the width.
    :param min_per_arm: clusters each arm needs (over the steps so far) before a metric is tested; with
        G clusters a step's cell has G - 1 degrees of freedom, so few clusters mean wide boundaries.
    """

    width: int = 60
    min_per_arm: int = 3


@dataclass(frozen=True)
class Metric:
    """One guardrail metric (Contract 3). See docs/spec.md for every field."""

    name: str
    source: str
    kind: str
    margin: float
    direction: str = "decrease"
    margin_type: str = "absolute"
    critical: bool = False
    threshold: float | str | None = None
    label_delay: int = 0

    @property
    def needs_labels(self) -> bool:
        """True for metrics computed from feedback labels (they honour ``label_delay``)."""
        return self.source in LABEL_SOURCES


@dataclass(frozen=True)
class Alpha:
    """Error rates: of rolling back a harmless canary, and of promoting a canary worse than a margin."""

    rollback: float = 0.05
    promotion: float = 0.05


@dataclass(frozen=True)
class Srm:
    """Sample-ratio-mismatch check: a chi-square p-value below ``alpha`` blocks promotion."""

    alpha: float = 0.001


@dataclass(frozen=True)
class CircuitBreaker:
    """Always-valid test that can stop a catastrophic canary before the end of a hold."""

    enabled: bool = True
    alpha: float = 0.001


@dataclass(frozen=True)
class DataQuality:
    """Great Expectations suite run on each arm's logged predictions (``suite: null`` turns it off)."""

    suite: str | None = None
    sample_size: int = 5000


@dataclass(frozen=True)
class Drift:
    """Drift check: features (``"all"`` or a list of names), histogram bins, PSI floor, rows sampled."""

    features: str | tuple[str, ...] = "all"
    bins: int = 10
    psi_floor: float = 0.1
    sample_size: int = 20000


@dataclass(frozen=True)
class PostDeploy:
    """After promotion: watch the new stable for ``window`` seconds and at least ``min_samples`` requests."""

    window: int = 600
    min_samples: int = 500


@dataclass(frozen=True)
class Notifications:
    """Where decisions are sent: an HTTP connection id for a webhook, and e-mail addresses."""

    webhook_conn_id: str | None = None
    email: tuple[str, ...] = ()


@dataclass(frozen=True)
class RolloutSpec:
    """A validated rollout spec, with the trigger params of one run merged in.

    :param model: the model name (also the DAG id suffix, ``canary_rollout__<model>``).
    :param candidate: the candidate version given in the trigger params, or ``None`` (scheduled runs
        resolve it at preflight; manual runs must give it).
    :param steps: canary percents per step, strictly increasing, ``0 < p <= 100``.
    :param lease: seconds a route change that gives the canary traffic stays valid without renewal.
    :param deadline: seconds the whole run may take (used as the DAG run timeout).
    :param source: the file the spec came from.
    :param overrides: the trigger params that changed the spec in this run (field -> value).
    """

    model: str
    description: str = ""
    owner: str = "airflow"
    connections: Connections = field(default_factory=Connections)
    steps: tuple[float, ...] = (1, 5, 25, 50)
    hold: Hold = field(default_factory=Hold)
    clusters: Clusters = field(default_factory=Clusters)
    lease: int = 900
    deadline: int = 86400
    metrics: tuple[Metric, ...] = ()
    alpha: Alpha = field(default_factory=Alpha)
    srm: Srm = field(default_factory=Srm)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    on_inconclusive: str = "rollback"
    data_quality: DataQuality = field(default_factory=DataQuality)
    drift: Drift = field(default_factory=Drift)
    post_deploy: PostDeploy = field(default_factory=PostDeploy)
    schedule: str | None = None
    notifications: Notifications = field(default_factory=Notifications)
    tags: tuple[str, ...] = ()
    candidate: str | None = None
    source: str = field(default="", compare=False)
    overrides: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def dag_id(self) -> str:
        """``canary_rollout__<model>``."""
        return f"canary_rollout__{self.model}"

    def metric(self, name: str) -> Metric:
        """The metric called ``name``."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(
            f"no metric {name!r} in {self.source or self.model}; known: {[m.name for m in self.metrics]}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON (durations in seconds), the form kept in the plan XCom.

        :func:`spec_from_dict` turns it back into an equal :class:`RolloutSpec`.
        """
        return {
            "model": self.model,
            "description": self.description,
            "owner": self.owner,
            "connections": {
                "router": self.connections.router,
                "prediction_log": self.connections.prediction_log,
            },
            "steps": list(self.steps),
            "hold": {
                "min_duration": self.hold.min_duration,
                "min_samples": self.hold.min_samples,
                "max_wait": self.hold.max_wait,
                "poll_interval": self.hold.poll_interval,
            },
            "clusters": {"width": self.clusters.width, "min_per_arm": self.clusters.min_per_arm},
            "lease": self.lease,
            "deadline": self.deadline,
            "metrics": [
                {
                    "name": m.name,
                    "source": m.source,
                    "kind": m.kind,
                    "direction": m.direction,
                    "margin": m.margin,
                    "margin_type": m.margin_type,
                    "critical": m.critical,
                    "threshold": m.threshold,
                    "label_delay": m.label_delay,
                }
                for m in self.metrics
            ],
            "alpha": {"rollback": self.alpha.rollback, "promotion": self.alpha.promotion},
            "srm": {"alpha": self.srm.alpha},
            "circuit_breaker": {"enabled": self.circuit_breaker.enabled, "alpha": self.circuit_breaker.alpha},
            "on_inconclusive": self.on_inconclusive,
            "data_quality": {"suite": self.data_quality.suite, "sample_size": self.data_quality.sample_size},
            "drift": {
                "features": self.drift.features
                if isinstance(self.drift.features, str)
                else list(self.drift.features),
                "bins": self.drift.bins,
                "psi_floor": self.drift.psi_floor,
                "sample_size": self.drift.sample_size,
            },
            "post_deploy": {"window": self.post_deploy.window, "min_samples": self.post_deploy.min_samples},
            "schedule": self.schedule,
            "notifications": {
                "webhook_conn_id": self.notifications.webhook_conn_id,
                "email": list(self.notifications.email),
            },
            "tags": list(self.tags),
        }

    def policy(self, **overrides: Any) -> Any:
        """The judge's :class:`canary.analysis.Policy` for this spec.

        ``overrides`` are passed to ``Policy`` (e.g. ``planned_canary_samples`` from the power plan).
        The analysis package is imported here, not at module level, to keep DAG parsing cheap.
        """
        from canary.analysis.policy import MetricPolicy, Policy

        metrics = tuple(
            MetricPolicy(
                name=m.name,
                source=m.source,
                kind=m.kind,
                direction=m.direction,
                margin=float(m.margin),
                margin_type=m.margin_type,
                critical=m.critical,
                label_delay_s=float(m.label_delay),
                threshold=m.threshold,
            )
            for m in self.metrics
        )
        kwargs: dict[str, Any] = {
            "metrics": metrics,
            "alpha_rollback": self.alpha.rollback,
            "alpha_promotion": self.alpha.promotion,
            "srm_alpha": self.srm.alpha,
            "circuit_breaker_enabled": self.circuit_breaker.enabled,
            "circuit_breaker_alpha": self.circuit_breaker.alpha,
            "on_inconclusive": self.on_inconclusive,
            "planned_looks": len(self.steps),
            "cluster_seconds": self.clusters.width,
            "min_clusters": self.clusters.min_per_arm,
            "expected_canary_share": tuple(p / 100.0 for p in self.steps),
        }
        kwargs.update(overrides)
        return Policy(**kwargs)

    def param_defaults(self) -> dict[str, Any]:
        """The trigger form's prefilled values: the spec's own options (an unchanged form changes nothing)."""
        return {
            "candidate": None,
            "steps": [_plain_number(p) for p in self.steps],
            "hold_min_duration": format_duration(self.hold.min_duration),
            "hold_min_samples": self.hold.min_samples,
            "hold_max_wait": format_duration(self.hold.max_wait),
            "margins": {m.name: m.margin for m in self.metrics},
        }


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------------------------- reader


class _Reader:
    """Walks raw YAML values, converts them, and collects every problem instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, path: str, value: Any, message: str, fix: str, file: str | None = None) -> Any:
        self.problems.append(Problem(file or self.file, path, value, message, fix))
        return _BAD

    def mapping(self, path: str, value: Any, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
        """Check ``value`` is a mapping with only ``allowed`` keys; return it (or {} when bad)."""
        if value is MISSING or value is None:
            return {}
        if not isinstance(value, dict):
            self.add(
                path,
                value,
                f"{what} must be a mapping of keys to values",
                f"write it as {{key: value, ...}} with keys among {', '.join(allowed)}",
            )
            return {}
        for key in value:
            if key not in allowed:
                self.unknown_key(_join(path, str(key)), key, allowed, what)
        return value

    def unknown_key(self, path: str, key: Any, allowed: tuple[str, ...], what: str) -> None:
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        self.add(path, key, f"unknown key {key!r} in {what}", f"{hint}allowed keys are {', '.join(allowed)}")

    def text(
        self,
        path: str,
        value: Any,
        *,
        pattern: re.Pattern[str] | None = None,
        what: str = "a name",
        fix: str = "",
        allow_empty: bool = True,
    ) -> Any:
        if not isinstance(value, str):
            return self.add(path, value, f"must be a string ({what})", fix or f"write {what} as text")
        if not allow_empty and not value.strip():
            return self.add(path, value, "must not be empty", fix or f"give {what}")
        if pattern is not None and not pattern.match(value):
            return self.add(path, value, f"is not a valid {what}", fix or f"match {pattern.pattern}")
        return value

    def integer(
        self, path: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, fix: str = ""
    ) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not value.is_integer())
        ):
            return self.add(path, value, "must be a whole number", fix or "write an integer, e.g. 500")
        value = int(value)
        return self._range(path, value, minimum, maximum, fix, exclusive_min=False)

    def number(
        self,
        path: str,
        value: Any,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_min: bool = False,
        exclusive_max: bool = False,
        fix: str = "",
    ) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return self.add(path, value, "must be a number", fix or "write a number, e.g. 0.05")
        return self._range(path, value, minimum, maximum, fix, exclusive_min, exclusive_max)

    def _range(
        self,
        path: str,
        value: Any,
        minimum: float | None,
        maximum: float | None,
        fix: str,
        exclusive_min: bool,
        exclusive_max: bool = False,
    ) -> Any:
        lo_bad = minimum is not None and (value <= minimum if exclusive_min else value < minimum)
        hi_bad = maximum is not None and (value >= maximum if exclusive_max else value > maximum)
        if lo_bad or hi_bad:
            lo = "" if minimum is None else f"{'>' if exclusive_min else '>='} {minimum}"
            hi = "" if maximum is None else f"{'<' if exclusive_max else '<='} {maximum}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            return self.add(path, value, f"is out of range: must be {bounds}", fix or f"use a value {bounds}")
        return value

    def boolean(self, path: str, value: Any) -> Any:
        if not isinstance(value, bool):
            return self.add(path, value, "must be true or false", "write true or false (without quotes)")
        return value

    def choice(self, path: str, value: Any, choices: tuple[str, ...], what: str) -> Any:
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return self.add(path, value, f"unknown {what}", f"{hint}use one of {', '.join(choices)}")
        return value

    def duration(self, path: str, value: Any, *, minimum: int = 0) -> Any:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            return self.add(path, value, "is not a duration", str(exc))
        if seconds < minimum:
            return self.add(
                path,
                value,
                f"is too short: must be at least {minimum} seconds",
                f"use a duration of at least {format_duration(minimum) if minimum else '0s'}",
            )
        return seconds

    def steps(self, path: str, value: Any, file: str | None = None) -> Any:
        fix_example = "list percents of traffic for the canary, e.g. [1, 5, 25, 50]"
        if not isinstance(value, list | tuple) or not value:
            return self.add(path, value, "must be a non-empty list of percents", fix_example, file)
        out: list[float] = []
        ok = True
        for i, p in enumerate(value):
            where = f"{path}[{i}]"
            if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
                self.add(where, p, "a step must be a number (percent of traffic)", fix_example, file)
                ok = False
                continue
            if not 0 < p <= 100:
                self.add(
                    where,
                    p,
                    "a step percent must be > 0 and <= 100",
                    "use percents in (0, 100], e.g. 1, 5, 25, 50",
                    file,
                )
                ok = False
                continue
            if abs(p * 100 - round(p * 100)) > 1e-9:
                self.add(
                    where,
                    p,
                    "the gateway routes in steps of 0.01 %",
                    "round the percent to at most two decimals",
                    file,
                )
                ok = False
                continue
            if out and p <= out[-1]:
                self.add(
                    where,
                    p,
                    f"steps must be strictly increasing: {_plain_number(p)} does not exceed the "
                    f"previous step {_plain_number(out[-1])}",
                    "list each percent once, in increasing order, e.g. [1, 5, 25, 50]",
                    file,
                )
                ok = False
            out.append(_plain_number(p))
        return tuple(out) if ok else _BAD


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _get(raw: dict[str, Any], key: str, default: Any) -> Any:
    """``raw[key]`` or the default; an explicit ``null`` for a field with a non-null default means default."""
    value = raw.get(key, MISSING)
    if value is MISSING or (value is None and default is not None):
        return default
    return value


# ---------------------------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping_plain(node, deep=deep)


_UniqueKeyLoader.construct_mapping_plain = _UniqueKeyLoader.construct_mapping  # type: ignore[attr-defined]
_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        lines = text.splitlines()
        shown = lines[mark.line].strip() if mark is not None and mark.line < len(lines) else None
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}, {problem}" if context else str(problem)
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    shown,
                    f"YAML syntax error at {where}: {detail}",
                    "fix the YAML syntax there (indentation, a missing ':' or an unclosed bracket or quote)",
                )
            ]
        ) from None


# ----------------------------------------------------------------------------------------- public API


def load_spec(
    path: str | Path, params: Mapping[str, Any] | None = None, *, require_candidate: bool = False
) -> RolloutSpec:
    """Load ``path``, merge the trigger ``params`` into it, validate both; every problem in one SpecError.

    :param path: ``include/rollouts/<model>.yaml``; the file name must be ``<model>.yaml``.
    :param params: the trigger form / run conf: ``candidate``, ``steps``, ``hold_min_duration``,
        ``hold_min_samples``, ``hold_max_wait``, ``margins`` ({metric: margin}). ``None`` values mean
        "use the spec"; unknown keys are errors.
    :param require_candidate: True for runs triggered by hand, which must name the candidate version.
    """
    path = Path(path)
    file = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    str(path),
                    "the spec file does not exist",
                    "create it under include/rollouts/ or fix the path",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    str(path),
                    f"the spec file cannot be read: {exc}",
                    "make it a readable UTF-8 text file",
                )
            ]
        ) from None
    return parse_spec(
        text, file=file, params=params, require_candidate=require_candidate, stem=path.stem, source=str(path)
    )


def parse_spec(
    text: str,
    *,
    file: str = "<spec>",
    params: Mapping[str, Any] | None = None,
    require_candidate: bool = False,
    stem: str | None = None,
    source: str = "",
) -> RolloutSpec:
    """Like :func:`load_spec` for YAML text already read; ``stem`` is the file name without ``.yaml``."""
    raw = _load_yaml(text, file)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    raw,
                    "the spec file is empty",
                    "write a spec; copy include/rollouts/fraud.yaml and change model: and metrics:",
                )
            ]
        )
    if not isinstance(raw, dict):
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    raw,
                    f"a spec must be a mapping of fields, not a {type(raw).__name__}",
                    "start the file with 'model: <name>' followed by the other fields",
                )
            ]
        )
    return _build(
        raw, file=file, params=params, require_candidate=require_candidate, stem=stem, source=source
    )


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<plan>") -> RolloutSpec:
    """A :class:`RolloutSpec` from :meth:`RolloutSpec.to_dict` output (e.g. ``plan["spec"]``), validated."""
    return _build(dict(data), file=source, params=None, require_candidate=False, stem=None, source=source)


def _build(
    raw: dict[str, Any],
    *,
    file: str,
    params: Mapping[str, Any] | None,
    require_candidate: bool,
    stem: str | None,
    source: str,
) -> RolloutSpec:
    r = _Reader(file)
    for key in raw:
        if key not in TOP_KEYS:
            r.unknown_key(str(key), key, TOP_KEYS, "the spec")

    # model
    model = raw.get("model", MISSING)
    if model is MISSING or model is None:
        model = r.add(
            "model",
            None,
            "the model name is required",
            f"add 'model: {stem or '<name>'}' (the file must be named <model>.yaml)",
        )
    else:
        model = r.text(
            "model",
            model,
            pattern=NAME_RE,
            what="model name",
            fix="use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)",
        )
        if model is not _BAD and stem is not None and model != stem:
            r.add(
                "model",
                model,
                f"the model name differs from the file name {stem!r}",
                f"rename the file to {model}.yaml or set 'model: {stem}' (one file per model keeps DAG ids "
                "unique)",
            )
            model = _BAD

    description = _get(raw, "description", "")
    description = r.text("description", description, what="a description")
    owner = r.text("owner", _get(raw, "owner", "airflow"), what="an owner", allow_empty=False)

    # connections
    c_raw = r.mapping(
        "connections", _get(raw, "connections", {}), ("router", "prediction_log"), "connections"
    )
    conns = {}
    for key in ("router", "prediction_log"):
        conns[key] = r.text(
            f"connections.{key}",
            _get(c_raw, key, DEFAULTS["connections"][key]),
            pattern=CONN_ID_RE,
            what="an Airflow connection id",
            fix="use the conn_id of an Airflow connection (letters, digits, '_', '.', '-')",
        )

    steps = r.steps("steps", _get(raw, "steps", DEFAULTS["steps"]))

    # hold
    h_raw = r.mapping("hold", _get(raw, "hold", {}), tuple(DEFAULTS["hold"]), "hold")
    hd = DEFAULTS["hold"]
    min_duration = r.duration("hold.min_duration", _get(h_raw, "min_duration", hd["min_duration"]))
    min_samples = r.integer(
        "hold.min_samples",
        _get(h_raw, "min_samples", hd["min_samples"]),
        minimum=1,
        fix="use a positive number of requests per arm, e.g. 500",
    )
    max_wait = r.duration("hold.max_wait", _get(h_raw, "max_wait", hd["max_wait"]), minimum=1)
    poll_interval = r.duration(
        "hold.poll_interval", _get(h_raw, "poll_interval", hd["poll_interval"]), minimum=1
    )

    # clusters
    cl_raw = r.mapping("clusters", _get(raw, "clusters", {}), tuple(DEFAULTS["clusters"]), "clusters")
    cld = DEFAULTS["clusters"]
    cl_width = r.duration("clusters.width", _get(cl_raw, "width", cld["width"]), minimum=1)
    if cl_width is not _BAD and 3600 % cl_width:
        cl_width = r.add(
            "clusters.width",
            _get(cl_raw, "width", cld["width"]),
            f"a cluster width must divide one hour ({format_duration(cl_width)} does not divide 3600 s)",
            "use a width that divides 3600 s, e.g. 5s, 10s, 15s, 30s, 1m (the default) or 5m",
        )
    cl_min = r.integer(
        "clusters.min_per_arm",
        _get(cl_raw, "min_per_arm", cld["min_per_arm"]),
        minimum=2,
        fix="use at least 2 clusters per arm (the cluster-robust variance needs two), e.g. 3",
    )

    lease = r.duration("lease", _get(raw, "lease", DEFAULTS["lease"]), minimum=1)
    deadline = r.duration("deadline", _get(raw, "deadline", DEFAULTS["deadline"]), minimum=1)

    metrics = _metrics(r, raw.get("metrics", MISSING))

    # alpha, srm, circuit breaker
    a_raw = r.mapping("alpha", _get(raw, "alpha", {}), ("rollback", "promotion"), "alpha")
    alpha_fix = "use a level between 0 and 0.5, e.g. 0.05"
    alpha_rb = r.number(
        "alpha.rollback",
        _get(a_raw, "rollback", 0.05),
        minimum=0,
        maximum=0.5,
        exclusive_min=True,
        exclusive_max=True,
        fix=alpha_fix,
    )
    alpha_pr = r.number(
        "alpha.promotion",
        _get(a_raw, "promotion", 0.05),
        minimum=0,
        maximum=0.5,
        exclusive_min=True,
        exclusive_max=True,
        fix=alpha_fix,
    )
    s_raw = r.mapping("srm", _get(raw, "srm", {}), ("alpha",), "srm")
    srm_alpha = r.number(
        "srm.alpha",
        _get(s_raw, "alpha", 0.001),
        minimum=0,
        maximum=0.5,
        exclusive_min=True,
        exclusive_max=True,
        fix="use a small level, e.g. 0.001",
    )
    cb_raw = r.mapping(
        "circuit_breaker", _get(raw, "circuit_breaker", {}), ("enabled", "alpha"), "circuit_breaker"
    )
    cb_enabled = r.boolean("circuit_breaker.enabled", _get(cb_raw, "enabled", True))
    cb_alpha = r.number(
        "circuit_breaker.alpha",
        _get(cb_raw, "alpha", 0.001),
        minimum=0,
        maximum=0.5,
        exclusive_min=True,
        exclusive_max=True,
        fix="use a small level, e.g. 0.001",
    )

    on_inconclusive = r.choice(
        "on_inconclusive", _get(raw, "on_inconclusive", "rollback"), ON_INCONCLUSIVE, "on_inconclusive action"
    )

    # data quality
    dq_raw = r.mapping(
        "data_quality", _get(raw, "data_quality", {}), ("suite", "sample_size"), "data_quality"
    )
    dq_suite = dq_raw.get("suite")
    if dq_suite is not None:
        dq_suite = r.text(
            "data_quality.suite",
            dq_suite,
            pattern=NAME_RE,
            what="suite name",
            fix="name a suite in include/expectations/ (letters, digits, '.', '_', '-'), or null",
        )
    dq_size = r.integer(
        "data_quality.sample_size",
        _get(dq_raw, "sample_size", 5000),
        minimum=1,
        fix="use a positive number of rows, e.g. 5000",
    )

    # drift
    d_raw = r.mapping("drift", _get(raw, "drift", {}), tuple(DEFAULTS["drift"]), "drift")
    features = _get(d_raw, "features", "all")
    if isinstance(features, list) and features:
        names = [
            r.text(
                f"drift.features[{i}]",
                f,
                pattern=FEATURE_RE,
                what="feature name",
                fix="use the feature's name as in the model's metadata (letters, digits, '_', '.', '-')",
            )
            for i, f in enumerate(features)
        ]
        features = tuple(names) if _BAD not in names else _BAD
    elif features != "all":
        features = r.add(
            "drift.features",
            features,
            "must be 'all' or a non-empty list of feature names",
            "write features: all, or features: [amount, merchant_risk]",
        )
    bins = r.integer(
        "drift.bins",
        _get(d_raw, "bins", 10),
        minimum=2,
        maximum=100,
        fix="use between 2 and 100 bins, e.g. 10",
    )
    psi_floor = r.number(
        "drift.psi_floor",
        _get(d_raw, "psi_floor", 0.1),
        minimum=0,
        exclusive_min=True,
        fix="use a PSI floor > 0, e.g. 0.1",
    )
    d_size = r.integer(
        "drift.sample_size",
        _get(d_raw, "sample_size", 20000),
        minimum=1,
        fix="use a positive number of rows, e.g. 20000",
    )

    # post deploy
    pd_raw = r.mapping("post_deploy", _get(raw, "post_deploy", {}), ("window", "min_samples"), "post_deploy")
    pd_window = r.duration("post_deploy.window", _get(pd_raw, "window", 600))
    pd_samples = r.integer(
        "post_deploy.min_samples",
        _get(pd_raw, "min_samples", 500),
        minimum=0,
        fix="use a number of requests >= 0, e.g. 500",
    )

    schedule = _schedule(r, raw.get("schedule"))

    # notifications
    n_raw = r.mapping(
        "notifications", _get(raw, "notifications", {}), ("webhook_conn_id", "email"), "notifications"
    )
    webhook = n_raw.get("webhook_conn_id")
    if webhook is not None:
        webhook = r.text(
            "notifications.webhook_conn_id",
            webhook,
            pattern=CONN_ID_RE,
            what="an Airflow connection id",
            fix="use the conn_id of an HTTP connection, or null",
        )
    emails = _get(n_raw, "email", [])
    if isinstance(emails, str):
        emails = [emails]
    if not isinstance(emails, list):
        emails = r.add(
            "notifications.email",
            emails,
            "must be a list of e-mail addresses",
            "write email: [team@example.com]",
        )
    else:
        checked = [
            r.text(
                f"notifications.email[{i}]",
                e,
                pattern=EMAIL_RE,
                what="e-mail address",
                fix="write a full address like team@example.com",
            )
            for i, e in enumerate(emails)
        ]
        emails = tuple(checked) if _BAD not in checked else _BAD

    tags = _get(raw, "tags", [])
    if not isinstance(tags, list):
        tags = r.add("tags", tags, "must be a list of tags", "write tags: [team-fraud]")
    else:
        checked = [
            r.text(
                f"tags[{i}]",
                t,
                pattern=TAG_RE,
                what="tag",
                fix="use short tags of letters, digits, '-', '_', '.', ':' or '/'",
            )
            for i, t in enumerate(tags)
        ]
        tags = tuple(checked) if _BAD not in checked else _BAD

    # cross-field checks (only between fields that are themselves valid). A field the spec does not set
    # (omitted, or written under a misspelled key) takes its default; the problem says so, or it would quote
    # a value the user never wrote.
    if _BAD not in (min_duration, max_wait) and max_wait < min_duration:
        unset = _unset_notes(
            raw,
            ("hold.min_duration", format_duration(min_duration)),
            ("hold.max_wait", format_duration(max_wait)),
        )
        r.add(
            "hold.max_wait",
            format_duration(max_wait),
            f"the maximum wait is shorter than hold.min_duration ({format_duration(min_duration)})"
            + unset.message,
            unset.fix(
                f"make max_wait at least {format_duration(min_duration)}, e.g. "
                f"{format_duration(4 * min_duration or 600)}",
                "keep hold.max_wait at least hold.min_duration",
            ),
        )
    if _BAD not in (lease, poll_interval) and lease < 2 * poll_interval:
        unset = _unset_notes(
            raw, ("hold.poll_interval", format_duration(poll_interval)), ("lease", format_duration(lease))
        )
        r.add(
            "lease",
            format_duration(lease),
            f"the lease must outlive two polls (hold.poll_interval is {format_duration(poll_interval)}) or the "
            "gateway returns traffic to stable between renewals" + unset.message,
            unset.fix(
                f"use a lease of at least {format_duration(2 * poll_interval)}, e.g. 15m",
                "keep the lease at least twice hold.poll_interval",
            ),
        )
    if _BAD not in (deadline, steps, min_duration, pd_window):
        needed = len(steps) * min_duration + pd_window
        if deadline < needed:
            unset = _unset_notes(
                raw,
                ("steps", _show([_plain_number(p) for p in steps])),
                ("hold.min_duration", format_duration(min_duration)),
                ("post_deploy.window", format_duration(pd_window)),
                ("deadline", format_duration(deadline)),
            )
            r.add(
                "deadline",
                format_duration(deadline),
                f"the deadline is shorter than the least time the rollout needs ({len(steps)} steps x "
                f"{format_duration(min_duration)} hold + {format_duration(pd_window)} post-deploy window)"
                + unset.message,
                unset.fix(
                    f"use a deadline of at least {format_duration(needed)}",
                    "keep the deadline at least the number of steps x hold.min_duration + post_deploy.window",
                ),
            )

    # trigger params
    candidate, overrides = None, {}
    p_file = f"{file} (trigger params)"
    if params is not None and not isinstance(params, Mapping):
        r.add("params", params, "the trigger params must be a JSON object", '{"candidate": "v2"}', p_file)
        params = {}
    params = dict(params or {})
    for key in params:
        if key not in PARAM_KEYS:
            close = difflib.get_close_matches(str(key), PARAM_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            r.add(
                f"params.{key}",
                key,
                f"unknown trigger param {key!r}",
                f"{hint}allowed params are {', '.join(PARAM_KEYS)}",
                p_file,
            )
    cand = params.get("candidate")
    if isinstance(cand, str) and not cand.strip():
        cand = None
    if cand is None:
        if require_candidate:
            r.add(
                "params.candidate",
                None,
                "a run triggered by hand must name the candidate version",
                'fill \'candidate\' in the trigger form (or conf {"candidate": "<version>"}); only scheduled '
                "runs pick the newest registered version themselves",
                p_file,
            )
    else:
        n_before = len(r.problems)
        candidate = r.text(
            "params.candidate",
            cand,
            pattern=NAME_RE,
            what="model version",
            fix="use a version name of letters, digits, '.', '_' or '-' (at most 64)",
        )
        _retag(r, n_before, p_file)
    if params.get("steps") is not None:
        new_steps = r.steps("params.steps", params["steps"], file=p_file)
        if new_steps is not _BAD and steps is not _BAD and len(new_steps) > len(steps):
            unset = _unset_notes(raw, ("steps", _show([_plain_number(p) for p in steps])))
            r.add(
                "params.steps",
                list(new_steps),
                f"the DAG has {len(steps)} traffic steps (from the spec file); an override may have fewer, not more"
                + unset.message,
                unset.fix(
                    f"give at most {len(steps)} percents, or add the steps to the spec file's steps:",
                    "give at most as many percents as the spec's steps",
                ),
                p_file,
            )
        elif new_steps is not _BAD and new_steps != steps:
            steps = new_steps
            overrides["steps"] = list(new_steps)
    for key, attr in (("hold_min_duration", "min_duration"), ("hold_max_wait", "max_wait")):
        if params.get(key) is not None:
            n_before = len(r.problems)
            v = r.duration(f"params.{key}", params[key], minimum=0 if attr == "min_duration" else 1)
            _retag(r, n_before, p_file)
            if v is not _BAD:
                if attr == "min_duration" and v != min_duration:
                    min_duration, overrides[key] = v, v
                elif attr == "max_wait" and v != max_wait:
                    max_wait, overrides[key] = v, v
    if params.get("hold_min_samples") is not None:
        n_before = len(r.problems)
        v = r.integer(
            "params.hold_min_samples",
            params["hold_min_samples"],
            minimum=1,
            fix="use a positive number of requests per arm, e.g. 500",
        )
        _retag(r, n_before, p_file)
        if v is not _BAD and v != min_samples:
            min_samples, overrides["hold_min_samples"] = v, v
    margins = params.get("margins")
    if margins is not None:
        known = tuple(m.name for m in metrics) if isinstance(metrics, tuple) else ()
        if not isinstance(margins, Mapping):
            r.add(
                "params.margins",
                margins,
                "must be an object of metric name to margin",
                '{"error_rate": 0.002}',
                p_file,
            )
        else:
            changed = {}
            for name, value in margins.items():
                where = f"params.margins.{name}"
                if known and name not in known:
                    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    unset = _unset_notes(raw, ("metrics", "(" + ", ".join(known) + ")"))
                    r.add(
                        where,
                        name,
                        f"no metric {name!r} in the spec" + unset.message,
                        unset.fix(
                            f"{hint}metrics are {', '.join(known)}", f"{hint}name a metric of the spec"
                        ),
                        p_file,
                    )
                    continue
                if value is None:
                    continue
                n_before = len(r.problems)
                v = r.number(where, value, minimum=0, fix="use a margin >= 0 (0 means no worse at all)")
                _retag(r, n_before, p_file)
                if v is not _BAD and known and v != next(m.margin for m in metrics if m.name == name):
                    changed[name] = v
            if changed:
                metrics = tuple(_replace_margin(m, changed) for m in metrics)
                overrides["margins"] = changed
    if params and _BAD not in (min_duration, max_wait) and max_wait < min_duration:
        if any(k in overrides for k in ("hold_min_duration", "hold_max_wait")):
            unset = _unset_params_notes(
                params,
                raw,
                ("hold_min_duration", format_duration(min_duration)),
                ("hold_max_wait", format_duration(max_wait)),
            )
            r.add(
                "params.hold_max_wait",
                format_duration(max_wait),
                f"the maximum wait is shorter than the minimum duration ({format_duration(min_duration)})"
                + unset.message,
                unset.fix(
                    "raise hold_max_wait or lower hold_min_duration",
                    "keep hold_max_wait at least hold_min_duration",
                ),
                p_file,
            )

    if r.problems:
        raise SpecError(r.problems)
    return RolloutSpec(
        model=model,
        description=description,
        owner=owner,
        connections=Connections(**conns),
        steps=steps,
        hold=Hold(
            min_duration=min_duration, min_samples=min_samples, max_wait=max_wait, poll_interval=poll_interval
        ),
        clusters=Clusters(width=cl_width, min_per_arm=cl_min),
        lease=lease,
        deadline=deadline,
        metrics=metrics,
        alpha=Alpha(rollback=alpha_rb, promotion=alpha_pr),
        srm=Srm(alpha=srm_alpha),
        circuit_breaker=CircuitBreaker(enabled=cb_enabled, alpha=cb_alpha),
        on_inconclusive=on_inconclusive,
        data_quality=DataQuality(suite=dq_suite, sample_size=dq_size),
        drift=Drift(features=features, bins=bins, psi_floor=psi_floor, sample_size=d_size),
        post_deploy=PostDeploy(window=pd_window, min_samples=pd_samples),
        schedule=schedule,
        notifications=Notifications(webhook_conn_id=webhook, email=emails),
        tags=tags,
        candidate=candidate,
        source=source,
        overrides=overrides,
    )


# ------------------------------------------------------------------------------------ unset fields


@dataclass(frozen=True)
class _Unset:
    """Why values a cross-field problem quotes are defaults: the fields the user omitted or misspelled.

    :param notes: one sentence per such field, e.g. ``hold.min_duration is not set (the unknown key
        'min_duraton' was ignored), so its default 10m applies``.
    :param renames: ``(unknown key, the key it was probably meant as)`` for each misspelled field.
    """

    notes: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def message(self) -> str:
        """``""``, or ``"; "`` and the notes, to append to the problem's message."""
        return "".join(f"; {n}" for n in self.notes)

    def fix(self, as_written: str, rule: str) -> str:
        """``as_written`` (the fix for the values as they are), or, when a field was misspelled, the rename
        first and the ``rule`` (the numbers of ``as_written`` are the defaults the rename replaces)."""
        if not self.renames:
            return as_written
        renames = " and ".join(f"{typo!r} to {key!r}" for typo, key in self.renames)
        return f"rename {renames} (see the unknown-key problem above), then {rule}"


def _misspelled(node: Any, key: str, allowed: tuple[str, ...]) -> list[str]:
    """Unknown keys of ``node`` whose did-you-mean suggestion is ``key``: probably meant as ``key``."""
    if not isinstance(node, dict):
        return []
    return [
        str(k)
        for k in node
        if k not in allowed and difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6) == [key]
    ]


def _ignored(typos: list[str], what: str = "key") -> str:
    if not typos:
        return ""
    if len(typos) == 1:
        return f" (the unknown {what} {typos[0]!r} was ignored)"
    return f" (the unknown {what}s {', '.join(map(repr, typos))} were ignored)"


def _unset_note(raw: Any, path: str, shown: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``None`` when the spec sets the field at the dotted ``path``; else why its default ``shown`` applies
    (naming an unknown key that was probably meant for it, or its section's) and the renames that fix it."""
    node: Any = raw
    allowed: tuple[str, ...] = TOP_KEYS
    parts = path.split(".")
    for i, part in enumerate(parts):
        value = node.get(part) if isinstance(node, dict) else None
        if value is None:
            typos = _misspelled(node, part, allowed)
            return (
                f"{path} is not set{_ignored(typos)}, so its default {shown} applies",
                [(t, part) for t in typos],
            )
        if i < len(parts) - 1:
            section = ".".join(parts[: i + 1])
            if not isinstance(value, dict):
                return f"{path} is not set ({section} is not a mapping), so its default {shown} applies", []
            node, allowed = value, tuple(DEFAULTS[part])
    return None


def _unset_notes(raw: Any, *fields: tuple[str, str]) -> _Unset:
    """:func:`_unset_note` for each ``(path, shown value)`` a cross-field check compares."""
    notes, renames = [], []
    for path, shown in fields:
        found = _unset_note(raw, path, shown)
        if found is not None:
            notes.append(found[0])
            renames.extend(found[1])
    return _Unset(tuple(notes), tuple(renames))


def _unset_params_notes(params: Mapping[str, Any], raw: Any, *fields: tuple[str, str]) -> _Unset:
    """Like :func:`_unset_notes` for trigger params (``hold_min_duration`` overrides ``hold.min_duration``):
    a param not given (or misspelled) leaves the spec's value, itself perhaps a default."""
    notes, renames = [], []
    for key, shown in fields:
        if params.get(key) is not None:
            continue
        typos = _misspelled(params, key, PARAM_KEYS)
        renames.extend((t, key) for t in typos)
        spec_path = key.replace("hold_", "hold.", 1)
        from_spec = "the spec's" if _unset_note(raw, spec_path, shown) is None else "the default"
        notes.append(
            f"{key} is not given{_ignored(typos, 'trigger param')}, so {from_spec} {spec_path} {shown} applies"
        )
    return _Unset(tuple(notes), tuple(renames))


def _tail(p: Problem) -> tuple[Any, ...]:
    return (p.path, p.value, p.message, p.fix)


def _retag(r: _Reader, n_before: int, file: str) -> None:
    """Problems added since ``n_before`` are about the trigger params, not the spec file."""
    for i in range(n_before, len(r.problems)):
        r.problems[i] = Problem(file, *_tail(r.problems[i]))


def _replace_margin(m: Metric, changed: dict[str, float]) -> Metric:
    if m.name not in changed:
        return m
    from dataclasses import replace

    return replace(m, margin=changed[m.name])


def _metrics(r: _Reader, value: Any) -> Any:
    if value is MISSING:
        value = DEFAULTS["metrics"]
    if not isinstance(value, list) or not value:
        return r.add(
            "metrics",
            value,
            "must be a non-empty list of metrics",
            "list at least one metric, e.g. - {name: error_rate, source: error, kind: binary, margin: 0.002}",
        )
    out: list[Metric] = []
    seen: set[str] = set()
    ok = True
    for i, m in enumerate(value):
        path = f"metrics[{i}]"
        if not isinstance(m, dict):
            r.add(
                path,
                m,
                "a metric must be a mapping",
                "write - {name: ..., source: ..., kind: ..., margin: ...}",
            )
            ok = False
            continue
        n_before = len(r.problems)
        r.mapping(path, m, METRIC_KEYS, f"metric {m.get('name', i)!r}")
        for req in ("name", "source", "kind", "margin"):
            if m.get(req) is None:
                example = {"name": "error_rate", "source": "error", "kind": "binary", "margin": "0.002"}[req]
                typos = _misspelled(m, req, METRIC_KEYS)
                r.add(
                    f"{path}.{req}",
                    None,
                    f"the metric's {req} is required{_ignored(typos)}",
                    f"rename {typos[0]!r} to {req!r}" if typos else f"add {req}: {example}",
                )
        name = m.get("name")
        if name is not None:
            name = r.text(
                f"{path}.name",
                name,
                pattern=METRIC_NAME_RE,
                what="metric name",
                fix="use a lower-case identifier like error_rate (letters, digits, '_')",
            )
            if name is not _BAD:
                if name in seen:
                    r.add(f"{path}.name", name, "duplicate metric name", "give every metric a unique name")
                seen.add(name)
        source = m.get("source")
        if source is not None:
            source = r.choice(f"{path}.source", source, SOURCES, "metric source")
        kind = m.get("kind")
        if kind is not None:
            kind = r.choice(f"{path}.kind", kind, KINDS, "metric kind")
        direction = r.choice(f"{path}.direction", _get(m, "direction", "decrease"), DIRECTIONS, "direction")
        margin = m.get("margin")
        if margin is not None:
            margin = r.number(
                f"{path}.margin",
                margin,
                minimum=0,
                fix="use a margin >= 0: how much worse the canary may be and still be promoted",
            )
        margin_type = r.choice(
            f"{path}.margin_type", _get(m, "margin_type", "absolute"), MARGIN_TYPES, "margin type"
        )
        critical = r.boolean(f"{path}.critical", _get(m, "critical", False))
        threshold = m.get("threshold")
        label_delay_raw = m.get("label_delay")
        label_delay = 0
        if isinstance(kind, str) and kind in KINDS and isinstance(source, str) and source in SOURCES:
            if source not in KIND_SOURCES[kind]:
                r.add(
                    f"{path}.source",
                    source,
                    f"source {source!r} does not fit kind {kind!r}",
                    f"for kind {kind} use a source among {', '.join(KIND_SOURCES[kind])}",
                )
        if kind == "latency_threshold":
            if threshold is None:
                typos = _misspelled(m, "threshold", METRIC_KEYS)
                r.add(
                    f"{path}.threshold",
                    None,
                    f"a latency_threshold metric needs a threshold{_ignored(typos)}",
                    f"rename {typos[0]!r} to 'threshold'"
                    if typos
                    else "add threshold: baseline_p95 (stable's p95 before the rollout) or milliseconds, e.g. 250",
                )
            elif threshold != "baseline_p95":
                threshold = r.number(
                    f"{path}.threshold",
                    threshold,
                    minimum=0,
                    exclusive_min=True,
                    fix="use milliseconds > 0 or baseline_p95",
                )
        elif threshold is not None and kind is not None:
            r.add(
                f"{path}.threshold",
                threshold,
                f"threshold only applies to kind latency_threshold, not {kind!r}",
                "remove threshold, or use kind: latency_threshold",
            )
        if label_delay_raw is not None:
            not_label = isinstance(source, str) and source in SOURCES and source not in LABEL_SOURCES
            if not_label and label_delay_raw not in (0, "0s"):
                r.add(
                    f"{path}.label_delay",
                    label_delay_raw,
                    f"label_delay only applies to label metrics, not source {source!r}",
                    f"remove label_delay, or use a label source ({', '.join(LABEL_SOURCES)})",
                )
            else:
                label_delay = r.duration(f"{path}.label_delay", label_delay_raw)
        if (
            margin_type == "relative"
            and isinstance(margin, int | float)
            and margin is not _BAD
            and margin > 10
        ):
            r.add(
                f"{path}.margin",
                margin,
                "a relative margin is a fraction of stable's value (0.1 = 10 %)",
                "use a fraction such as 0.1, or margin_type: absolute",
            )
        if len(r.problems) > n_before:
            ok = False
            continue
        out.append(
            Metric(
                name=name,
                source=source,
                kind=kind,
                margin=margin,
                direction=direction,
                margin_type=margin_type,
                critical=critical,
                threshold=threshold,
                label_delay=label_delay,
            )
        )
    return tuple(out) if ok else _BAD


def _schedule(r: _Reader, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return r.add(
            "schedule",
            value,
            "must be null, a cron expression or a preset",
            "write schedule: null, '0 2 * * *' (02:00 every night) or @daily",
        )
    value = value.strip()
    if value.startswith("@"):
        if value not in SCHEDULE_PRESETS:
            close = difflib.get_close_matches(value, SCHEDULE_PRESETS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return r.add(
                "schedule",
                value,
                "is not a schedule preset for nightly promotion",
                f"{hint}use one of {', '.join(SCHEDULE_PRESETS)} or a cron expression",
            )
        return value
    fields = value.split()
    if len(fields) != 5 or not all(re.fullmatch(r"[0-9*/,\-A-Za-z?LW#]+", f) for f in fields):
        return r.add(
            "schedule",
            value,
            "is not a cron expression of 5 fields",
            "write minute hour day-of-month month day-of-week, e.g. '0 2 * * *'",
        )
    from croniter import croniter  # only when a cron schedule is set; cheap, pure Python

    if not croniter.is_valid(value):
        return r.add(
            "schedule",
            value,
            "is not a valid cron expression",
            "check each field's range (minute 0-59, hour 0-23, ...), e.g. '0 2 * * *'",
        )
    return value
