"""Sticky, monotone routing: the canary share matches the percent, units stay on their arm, raising the percent
only moves units from stable to canary. The router function in-process at 20,000 units, and the real HTTP service.
"""

from __future__ import annotations

import random
from datetime import datetime

import pytest
import requests
from gateway.routing import Route, assign, bucket_of
from gw_util import fraud_requests, predict, query
from scipy.stats import chisquare


def _route(percent: float, salt: str = "s1", mode: str = "split") -> Route:
    return Route("fraud", "v1", "v2", percent, mode, 1, None, salt, datetime(2026, 1, 1))


def _share_p_value(canary: int, total: int, percent: float) -> float:
    expected = total * percent / 100.0
    return float(chisquare([canary, total - canary], [expected, total - expected]).pvalue)


@pytest.mark.parametrize("percent", [1, 5, 25, 50])
def test_router_share_matches_percent_over_20000_units(percent: float) -> None:
    units = [f"user-{i}" for i in range(20_000)]
    arms = [assign(_route(percent), unit).arm for unit in units]
    canary = arms.count("canary")
    assert _share_p_value(canary, len(units), percent) > 0.001, (percent, canary)


def test_router_requests_without_unit_get_random_buckets() -> None:
    rng = random.Random(3)
    arms = [assign(_route(10), None, rng).arm for _ in range(20_000)]
    assert _share_p_value(arms.count("canary"), 20_000, 10) > 0.001


def test_router_is_sticky_and_monotone() -> None:
    units = [f"user-{i}" for i in range(20_000)]
    previous: set[str] = set()
    for percent in (0, 1, 5, 25, 50, 100):
        canary = {u for u in units if assign(_route(percent), u).arm == "canary"}
        assert previous <= canary, f"raising to {percent}% moved a unit from canary back to stable"
        assert canary == {u for u in units if assign(_route(percent), u).arm == "canary"}  # same answer again
        previous = canary
    assert previous == set(units)
    # the bucket is the contract's hash
    assert bucket_of("fraud", "s1", "user-1") == int(
        __import__("hashlib").sha256(b"fraud:s1:user-1").hexdigest()[:8], 16
    ) % 10000


def test_router_shadow_answers_with_stable_and_mirrors_to_canary() -> None:
    chosen = [assign(_route(100, mode="shadow"), f"u{i}") for i in range(100)]
    assert {c.arm for c in chosen} == {"stable"}
    assert {c.version for c in chosen} == {"v1"}
    assert {c.shadow_version for c in chosen} == {"v2"}


def test_http_share_stickiness_and_monotone_raise(gateway, db_url: str) -> None:
    session = requests.Session()
    r = gateway.set_route("fraud", stable="v1", canary="v2", canary_percent=25, lease_seconds=600)
    assert r.status_code == 200, r.text
    bodies = fraud_requests(1500, seed=1, units=1_000_000)
    answered = []
    for i, body in enumerate(bodies):
        body = {**body, "unit_id": f"share-{i}"}  # one request per unit: the share test needs independent units
        response = predict(session, gateway, body)
        assert response.status_code == 200, response.text
        answered.append(response.json())
    canary = sum(a["arm"] == "canary" for a in answered)
    assert _share_p_value(canary, len(answered), 25) > 0.001, canary
    assert {a["version"] for a in answered if a["arm"] == "canary"} == {"v2"}
    assert {a["version"] for a in answered if a["arm"] == "stable"} == {"v1"}

    sticky_units = [f"sticky-{i}" for i in range(150)]
    features = bodies[0]["features"]
    first: dict[str, str] = {}
    for _ in range(3):
        for unit in sticky_units:
            arm = predict(session, gateway, {"unit_id": unit, "features": features}).json()["arm"]
            assert first.setdefault(unit, arm) == arm, f"unit {unit} changed arm without a route change"
    r = gateway.set_route("fraud", stable="v1", canary="v2", canary_percent=60, lease_seconds=600)
    assert r.status_code == 200, r.text
    after = {u: predict(session, gateway, {"unit_id": u, "features": features}).json()["arm"] for u in sticky_units}
    moved_back = [u for u in sticky_units if first[u] == "canary" and after[u] != "canary"]
    assert not moved_back, f"raising the percent moved units back to stable: {moved_back}"
    assert sum(a == "canary" for a in after.values()) > sum(a == "canary" for a in first.values())
    session.close()

    gateway.stop()
    logged = dict(query(db_url, "SELECT arm, COUNT(*) FROM predictions WHERE unit_id LIKE 'share-%' GROUP BY arm"))
    assert logged == {"canary": canary, "stable": len(answered) - canary}
