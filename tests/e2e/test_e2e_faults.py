"""Fault tests: the gateway dies during a hold, a task is retried after it changed the route, a second
rollout is started while a canary is active."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

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


def test_retried_set_traffic_and_analyze_do_not_step_twice_and_keep_the_verdict(make_stack):
    """The first try of step_1.set_traffic changes the route and then fails; the first try of step_1.analyze
    decides and then fails. Their retries must find the change in place (no second step, same start time)
    and reach the same verdict from the same recorded windows."""
    stack = make_stack("sqlite")
    stack.start_traffic()
    dag_tasks = {}
    first_try: dict[str, object] = {}

    def flaky_once(task_id, original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if task_id not in first_try:
                first_try[task_id] = out
                raise RuntimeError(f"injected fault after {task_id} did its work")
            return out
        return wrapper

    def instrument(dag):
        for task in dag.tasks:
            dag_tasks[task.task_id] = task
        st = dag_tasks["step_1.set_traffic"]
        st.python_callable = flaky_once("step_1.set_traffic", st.python_callable)
        an = dag_tasks["step_1.analyze"]
        an._look = flaky_once("step_1.analyze", an._look)
        for task_id in ("step_1.set_traffic", "step_1.analyze"):
            dag_tasks[task_id].retries = 1
            dag_tasks[task_id].retry_delay = timedelta(seconds=1)
            dag_tasks[task_id].retry_exponential_backoff = False

    result = stack.run({"candidate": "v4"}, instrument=instrument)
    assert result.states["step_1.set_traffic"] == "success", result.summary()
    pre = result.xcoms["preflight"]
    first, final = first_try["step_1.set_traffic"], result.xcoms["step_1.set_traffic"]
    # One change only: the generation moved by exactly one, the step start is the one the first try set.
    assert first["route"]["generation"] == pre["generation"] + 1
    assert final["route"]["generation"] == first["route"]["generation"]
    assert final["step_started_at"] == first["step_started_at"]
    assert result.states["step_1.analyze"] == "success", result.summary()
    assert result.xcoms["step_1.analyze"]["verdict"] == first_try["step_1.analyze"]["verdict"]
    assert result.xcoms["step_1.analyze"]["record"] == first_try["step_1.analyze"]["record"]


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
