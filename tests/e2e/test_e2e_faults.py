"""Fault tests: the gateway dies during a hold, a second rollout is started while a canary is active.

(A task retried after it changed the route is exercised on the broken candidate's run in test_e2e_rollouts.)
"""

from __future__ import annotations

import threading
import time

import requests


def _wait(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def test_gateway_killed_during_hold_fails_safe_and_lease_returns_traffic(make_stack):
    from gateway.testing import start_gateway

    stack = make_stack("sqlite")
    stack.start_traffic()
    gw = stack.gateway
    killed = {}

    def kill_when_canary_is_live() -> None:
        def live():
            try:
                return stack.route()["canary_percent"] > 0
            except requests.RequestException:
                return False

        if _wait(live, timeout=120):
            time.sleep(1.5)  # inside the hold (min_duration 5 s)
            killed["route"] = stack.route()
            gw.kill()
            killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_when_canary_is_live, daemon=True)
    killer.start()
    result = stack.run({"candidate": "v2"})
    killer.join(5)
    assert "at" in killed, "the canary never went live"
    assert result.state == "failed", result.summary()
    assert result.states["step_1.hold"] == "failed", result.summary()
    assert result.states["step_1.analyze"] == "upstream_failed"
    fail_safe = result.xcoms["fail_safe:fail_safe"]
    assert fail_safe["reached_gateway"] is False and "lease" in fail_safe["reason"], fail_safe

    # The gateway comes back on the same log/route store: the lease this run no longer renews expires and the
    # gateway itself returns all traffic to stable.
    stack.traffic.stop()
    back = start_gateway(stack.model_dir, stack.store.db_url, token=gw.token,
                         extra_args=["--lease-check-interval", "0.2"])
    stack.extra_gateways.append(back)
    stack.set_gateway(back)
    lease_s = 20
    route = _wait(lambda: (r := stack.route())["canary_percent"] == 0 and r, timeout=lease_s + 15)
    assert route, f"traffic still on the canary after the lease: {stack.route()}"
    assert route["stable"] == "v1" and route["generation"] > killed["route"]["generation"]


def test_second_run_refused_while_a_canary_is_active(make_stack):
    """Another rollout's canary is live on the route (v2 at 5 % under its lease): a new run for the model is
    refused in pre-flight and leaves that route exactly as it was (its fail-safe does not touch it)."""
    stack = make_stack("sqlite")
    stack.start_traffic(warmup_rows=50)
    g = stack.route()["generation"]
    resp = stack.gateway.set_route("fraud", stable="v1", canary="v2", canary_percent=5, mode="split",
                                   lease_seconds=300, if_generation=g)
    assert resp.status_code == 200, resp.text
    active = stack.route()
    result = stack.run({"candidate": "v3"})
    assert result.state == "failed"
    assert result.states["preflight"] == "failed", result.summary()
    assert "step_1.set_traffic:intent" not in result.xcoms
    assert result.xcoms["fail_safe:fail_safe"]["changed"] is False
    after = stack.route()
    assert after == active, f"the active rollout's route changed: {active} -> {after}"
