"""Triggers: exact serialize() output, and run() with asyncio.run against the real gateway and its SQLite log."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
import requests
from canary import runtime
from canary.hooks.router import TrafficRouterHook
from canary.hooks.timeutil import iso, parse_ts, utcnow
from canary.spec import load_spec
from canary.triggers.hold import HoldTrigger, LookAgainTrigger, PostDeployHoldTrigger

FEATURES = {"amount": 42.0, "hour": 13.0, "account_age_days": 300.0, "tx_last_24h": 2.0, "merchant_risk": 0.2,
            "country": 1.0, "distance_km": 5.0}


@pytest.fixture
def plan(router_conn, gateway, set_conn, tmp_path):
    set_conn("canary_test_log", conn_type="sqlite", host=str(tmp_path / "log.db"))
    spec = load_spec("include/rollouts/fraud.yaml").to_dict()
    spec["connections"] = {"router": router_conn, "prediction_log": "canary_test_log"}
    spec["hold"] = {"min_duration": 1, "min_samples": 20, "max_wait": 30, "poll_interval": 1}
    spec["lease"] = 30
    for m in spec["metrics"]:
        if m.get("label_delay"):
            m["label_delay"] = 0
    return {"spec": spec, "candidate": "v2", "run_id": "t"}


def _canary_live(router_conn, percent=50.0):
    hook = TrafficRouterHook(router_conn)
    g = hook.get_route("fraud").generation
    return hook.set_route("fraud", stable="v1", canary="v2", canary_percent=percent, lease_seconds=30,
                          if_generation=g)


def _traffic(gateway, n, label=True):
    s = requests.Session()
    for i in range(n):
        r = s.post(f"{gateway.url}/v1/models/fraud/predict", json={"unit_id": f"u{i}", "features": FEATURES},
                   timeout=10)
        r.raise_for_status()
        if label:
            s.post(f"{gateway.url}/v1/models/fraud/feedback",
                   json={"request_id": r.json()["request_id"], "label": 0}, timeout=10).raise_for_status()


async def _first_event(trigger, timeout=30.0):
    async def first():
        async for event in trigger.run():
            return event.payload

    return await asyncio.wait_for(first(), timeout)


def test_serialize_round_trips_exactly():
    t = HoldTrigger(plan={"spec": {"model": "m"}}, pre={"stable": "a"}, step_index=2,
                    step_started_at="2026-01-01T00:00:00+00:00", generation=7, poll_interval=5)
    path, kwargs = t.serialize()
    assert path == "canary.triggers.hold.HoldTrigger"
    assert kwargs == {"plan": {"spec": {"model": "m"}}, "pre": {"stable": "a"}, "step_index": 2,
                      "step_started_at": "2026-01-01T00:00:00+00:00", "generation": 7, "poll_interval": 5.0}
    assert HoldTrigger(**kwargs).serialize() == (path, kwargs)
    la = LookAgainTrigger(plan={}, pre={}, generation=3, since="2026-01-01T00:00:00+00:00", seconds=4,
                          carry={"look": 2})
    assert la.serialize() == ("canary.triggers.hold.LookAgainTrigger",
                              {"plan": {}, "pre": {}, "generation": 3, "since": "2026-01-01T00:00:00+00:00",
                               "seconds": 4.0, "carry": {"look": 2}})
    pd = PostDeployHoldTrigger(plan={}, pre={}, promoted_at="x", poll_interval=1)
    assert PostDeployHoldTrigger(**pd.serialize()[1]).serialize() == pd.serialize()


def test_hold_ends_when_min_time_and_samples_per_arm_are_reached_and_renews_the_lease(plan, gateway,
                                                                                      router_conn):
    route = _canary_live(router_conn)
    pre = {"stable": "v1", "candidate": "v2", "generation": route.generation - 1}
    trigger = HoldTrigger(plan=plan, pre=pre, step_index=1, step_started_at=route.updated_at,
                          generation=route.generation, poll_interval=0.3)
    _traffic(gateway, 120)
    time.sleep(0.5)  # the gateway's batch writer flushes
    event = asyncio.run(_first_event(trigger))
    assert event["status"] == "ok" and event["reason"] == "min_reached", event
    counts = event["counts"]
    assert counts["stable"]["requests"] >= 20 and counts["canary"]["requests"] >= 20
    assert counts["stable"]["requests"] + counts["canary"]["requests"] == 120
    assert counts["canary"]["labelled"] >= 4  # matured labels (label delay 0 here)
    assert parse_ts(event["look_at"]) >= parse_ts(route.updated_at) + timedelta(seconds=1)
    renewed = TrafficRouterHook(router_conn).get_route("fraud")
    assert renewed.generation == route.generation and renewed.lease_expires_at > route.lease_expires_at
    # Running it again (a triggerer restart) reaches the same conclusion from the recorded step start.
    again = asyncio.run(_first_event(trigger))
    assert again["reason"] == "min_reached" and again["counts"]["canary"]["requests"] == counts["canary"]["requests"]


def test_hold_is_capped_by_max_wait(plan, router_conn):
    plan["spec"]["hold"] = {"min_duration": 1, "min_samples": 10_000, "max_wait": 2, "poll_interval": 1}
    route = _canary_live(router_conn)
    pre = {"stable": "v1", "candidate": "v2", "generation": route.generation - 1}
    event = asyncio.run(_first_event(HoldTrigger(plan=plan, pre=pre, step_index=1, step_started_at=route.updated_at,
                                                 generation=route.generation, poll_interval=0.3)))
    assert event["status"] == "ok" and event["reason"] == "max_wait"
    assert event["elapsed_s"] >= 2


def test_hold_reports_a_route_changed_by_someone_else(plan, router_conn):
    route = _canary_live(router_conn)
    hook = TrafficRouterHook(router_conn)
    hook.set_route("fraud", stable="v1", canary=None, canary_percent=0, if_generation=route.generation)
    pre = {"stable": "v1", "candidate": "v2", "generation": route.generation - 1}
    event = asyncio.run(_first_event(HoldTrigger(plan=plan, pre=pre, step_index=1, step_started_at=route.updated_at,
                                                 generation=route.generation, poll_interval=0.3)))
    assert event["status"] == "error" and event["error_type"] == "RouteConflictError", event


def test_look_again_waits_until_the_planned_time_and_hands_back_its_carry(plan, router_conn):
    route = _canary_live(router_conn)
    since = utcnow()
    t0 = time.monotonic()
    event = asyncio.run(_first_event(LookAgainTrigger(plan=plan, pre={}, generation=route.generation,
                                                      since=iso(since), seconds=1.0, carry={"look": 3})))
    assert time.monotonic() - t0 >= 0.8
    assert event == {"status": "ok", "look_at": iso(since + timedelta(seconds=1.0)), "carry": {"look": 3}}


def test_circuit_breaker_trips_on_a_flood_of_canary_errors(plan):
    quiet = {"stable": {"requests": 2000, "errors": 2, "labelled": 0},
             "canary": {"requests": 200, "errors": 0, "labelled": 0}}
    flood = {"stable": {"requests": 2000, "errors": 2, "labelled": 0},
             "canary": {"requests": 200, "errors": 60, "labelled": 0}}
    assert runtime.circuit_breaker(plan, quiet) is None
    fired = runtime.circuit_breaker(plan, flood)
    assert fired and fired["tripped"] and fired["canary"] == [60, 200]
    plan["spec"]["circuit_breaker"]["enabled"] = False
    assert runtime.circuit_breaker(plan, flood) is None


def test_breaker_ends_the_hold_early_and_the_look_rolls_back(plan, gateway, router_conn):
    """v4 raises on country 4 (HTTP 500, logged as errors): with half the traffic on it the hold's breaker
    trips long before min_duration, and the look that follows rolls back on it."""
    plan["candidate"] = "v4"
    plan["spec"]["hold"] = {"min_duration": 60, "min_samples": 10_000, "max_wait": 120, "poll_interval": 1}
    hook = TrafficRouterHook(router_conn)
    g = hook.get_route("fraud").generation
    route = hook.set_route("fraud", stable="v1", canary="v4", canary_percent=50, lease_seconds=60, if_generation=g)
    pre = {"stable": "v1", "candidate": "v4", "generation": g, "baseline": {"latency_p95_ms": 50.0},
           "power_plan": {"planned_canary_samples": 1000}}
    s = requests.Session()
    for i in range(300):
        feats = {**FEATURES, "country": 4.0 if i % 3 == 0 else 1.0}
        s.post(f"{gateway.url}/v1/models/fraud/predict", json={"unit_id": f"u{i}", "features": feats}, timeout=10)
    time.sleep(0.5)
    t0 = time.monotonic()
    event = asyncio.run(_first_event(HoldTrigger(plan=plan, pre=pre, step_index=1, step_started_at=route.updated_at,
                                                 generation=route.generation, poll_interval=0.3)))
    assert event["reason"] == "circuit_breaker" and time.monotonic() - t0 < 30, event
    assert event["breaker"]["tripped"] and event["breaker"]["canary"][0] > 0 == event["breaker"]["stable"][0]
    steps = [{"step_index": 1, "percent": 50, "step_started_at": route.updated_at, "look_at": event["look_at"],
              "breaker": event["breaker"]}]
    plan["spec"]["data_quality"] = {"suite": None, "sample_size": 100}
    analysis = runtime.analyze(plan, pre, steps, None)
    assert analysis["verdict"]["decision"] == "rollback"
    assert "circuit breaker" in analysis["verdict"]["reason"] and "circuit breaker" in analysis["record"]
    # The root cause points at the segment: country 4 is where the canary fails.
    segments = runtime.worst_segments(plan, pre, [(parse_ts(route.updated_at), parse_ts(event["look_at"]))],
                                      ["error_rate"])
    assert segments[0]["metric"] == "error_rate" and segments[0]["segment"] == "country=4", segments
    assert segments[0]["canary"] == 1.0 and segments[0]["stable"] == 0.0
