"""The route of one model and the pure function that assigns a request to an arm.

Routing is sticky and monotone (Contract 1): a unit's bucket is
`int(sha256(f"{model}:{salt}:{unit_id}").hexdigest()[:8], 16) % 10000` and the unit goes to the canary when
`bucket < round(canary_percent * 100)`. Raising the percent therefore only moves units from stable to canary,
and a unit keeps its arm as long as the percent and the salt stay the same. A request without a unit id gets a
random bucket of its own.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

BUCKETS = 10_000
MODES = ("split", "shadow")


def bucket_of(model: str, salt: str, unit_id: str) -> int:
    """The unit's bucket in [0, 10000) for this model and salt."""
    digest = hashlib.sha256(f"{model}:{salt}:{unit_id}".encode()).hexdigest()
    return int(digest[:8], 16) % BUCKETS


def threshold_of(canary_percent: float) -> int:
    """Buckets strictly below this number go to the canary."""
    return round(canary_percent * 100)


def utcnow() -> datetime:
    """Naive UTC now: the prediction log and the routes table store naive UTC timestamps (Contract 2)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(ts: datetime | None) -> str | None:
    """ISO-8601 UTC text with a `Z`, or None."""
    if ts is None:
        return None
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class Route:
    """Where a model's traffic goes.

    :param model: model name.
    :param stable: version that answers all traffic not sent to the canary.
    :param canary: candidate version, or None. Kept for the record after a lease expiry (percent 0).
    :param canary_percent: share of buckets (0..100, two decimals) sent to the canary (split) or mirrored to it
        (shadow).
    :param mode: `split` (the canary answers its share) or `shadow` (stable answers, canary is called and logged).
    :param generation: incremented by every change; the compare-and-set token.
    :param lease_expires_at: naive UTC time when the canary's share returns to stable unless renewed; None when
        the canary has no traffic.
    :param salt: hashing salt; constant for the life of the route so units keep their buckets.
    :param updated_at: naive UTC time of the last change.
    """

    model: str
    stable: str
    canary: str | None
    canary_percent: float
    mode: str
    generation: int
    lease_expires_at: datetime | None
    salt: str
    updated_at: datetime

    @property
    def canary_has_traffic(self) -> bool:
        """True when some requests go to (or are mirrored to) the canary."""
        return self.canary is not None and threshold_of(self.canary_percent) > 0

    def lease_expired(self, now: datetime) -> bool:
        """True when a lease exists and `now` is at or past its end."""
        return self.lease_expires_at is not None and now >= self.lease_expires_at

    def expired(self, now: datetime) -> Route:
        """The route after its lease ran out: all traffic to stable, canary kept for the record."""
        return replace(
            self,
            canary_percent=0.0,
            mode="split",
            generation=self.generation + 1,
            lease_expires_at=None,
            updated_at=now,
        )

    def renewed(self, lease_seconds: int, now: datetime) -> Route:
        """The same route with the lease extended to `now + lease_seconds` (generation unchanged)."""
        return replace(self, lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)

    def to_dict(self) -> dict:
        """The JSON answer of `GET /v1/models/{model}/route`."""
        return {
            "model": self.model,
            "stable": self.stable,
            "canary": self.canary,
            "canary_percent": self.canary_percent,
            "mode": self.mode,
            "generation": self.generation,
            "lease_expires_at": iso(self.lease_expires_at),
            "salt": self.salt,
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class Assignment:
    """Which version answers a request and whether the canary is called in shadow.

    :param arm: `stable` or `canary` (the arm that answers).
    :param version: the answering version.
    :param shadow_version: the canary version to call in shadow after answering, or None.
    :param bucket: the request's bucket, for debugging.
    """

    arm: str
    version: str
    shadow_version: str | None
    bucket: int


def assign(route: Route, unit_id: str | None, rng: random.Random | None = None) -> Assignment:
    """Assign one request to an arm under `route` (pure apart from the random bucket for requests without unit)."""
    if unit_id is None:
        bucket = (rng or random).randrange(BUCKETS)
    else:
        bucket = bucket_of(route.model, route.salt, unit_id)
    in_canary = route.canary is not None and bucket < threshold_of(route.canary_percent)
    if not in_canary:
        return Assignment("stable", route.stable, None, bucket)
    if route.mode == "shadow":
        return Assignment("stable", route.stable, route.canary, bucket)
    return Assignment("canary", route.canary, None, bucket)  # type: ignore[arg-type]


class RouteRequestError(ValueError):
    """A route change body with a bad value; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class RouteRequest:
    """A validated body of `PUT /v1/models/{model}/route` (versions not yet checked against the registry)."""

    stable: str
    canary: str | None
    canary_percent: float
    mode: str
    lease_seconds: int | None
    if_generation: int | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ROUTE_FIELDS = {"stable", "canary", "canary_percent", "mode", "lease_seconds", "if_generation"}


def parse_route_request(body: object) -> RouteRequest:
    """Check a route change body field by field; raise `RouteRequestError` on the first bad value."""
    from gateway.names import is_valid_name

    if not isinstance(body, dict):
        raise RouteRequestError("route body must be a JSON object with stable, canary, canary_percent, mode")
    unknown = sorted(set(body) - ROUTE_FIELDS)
    if unknown:
        raise RouteRequestError(f"unknown route field(s) {unknown}; allowed: {sorted(ROUTE_FIELDS)}")
    stable = body.get("stable")
    if not is_valid_name(stable):
        raise RouteRequestError(f"stable={stable!r}: give the name of a registered version of this model")
    canary = body.get("canary")
    if canary is not None and not is_valid_name(canary):
        raise RouteRequestError(f"canary={canary!r}: give a registered version name or null")
    if canary is not None and canary == stable:
        raise RouteRequestError(f"canary={canary!r} equals stable: the canary must be a different version")
    percent = body.get("canary_percent", 0)
    if not _is_number(percent) or not (0 <= percent <= 100) or percent != percent:
        raise RouteRequestError(f"canary_percent={percent!r}: must be a number from 0 to 100")
    percent = float(percent)
    mode = body.get("mode", "split")
    if mode not in MODES:
        raise RouteRequestError(f"mode={mode!r}: must be 'split' or 'shadow'")
    if canary is None and threshold_of(percent) > 0:
        raise RouteRequestError(f"canary_percent={percent} with canary=null: name a canary version or use 0")
    if canary is None and mode == "shadow":
        raise RouteRequestError("mode='shadow' with canary=null: name the canary version to call in shadow")
    lease = body.get("lease_seconds")
    if lease is not None and (not _is_int(lease) or lease <= 0):
        raise RouteRequestError(f"lease_seconds={lease!r}: must be a whole number of seconds > 0")
    gives_traffic = canary is not None and threshold_of(percent) > 0
    if lease is None and (gives_traffic or mode == "shadow"):
        raise RouteRequestError(
            f"canary_percent={percent} mode={mode!r} without lease_seconds: a canary share or shadow mode needs "
            "a lease so traffic returns to stable if the rollout stops renewing it; add lease_seconds"
        )
    generation = body.get("if_generation")
    if generation is not None and not _is_int(generation):
        raise RouteRequestError(f"if_generation={generation!r}: must be an integer (the route's generation)")
    return RouteRequest(stable, canary, percent, mode, lease, generation)


def parse_renew_request(body: object) -> tuple[int, int]:
    """Check a lease renewal body `{"if_generation": int, "lease_seconds": int}`; return both."""
    if not isinstance(body, dict):
        raise RouteRequestError("renew body must be a JSON object with if_generation and lease_seconds")
    generation, lease = body.get("if_generation"), body.get("lease_seconds")
    if not _is_int(generation):
        raise RouteRequestError(f"if_generation={generation!r}: must be the integer generation of the route")
    if not _is_int(lease) or lease <= 0:
        raise RouteRequestError(f"lease_seconds={lease!r}: must be a whole number of seconds > 0")
    return generation, lease
