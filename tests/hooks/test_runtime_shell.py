"""The runtime's pre-flight and traffic steps against the real gateway: no mocks, routes checked after."""

from __future__ import annotations

import json
import shutil

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from canary import runtime
from canary.hooks.router import TrafficRouterHook


@pytest.fixture
def make_plan(router_conn, set_conn, tmp_path):
    set_conn("canary_test_log", conn_type="sqlite", host=str(tmp_path / "log.db"))

    def make(params=None, run_type="manual", **spec_changes):
        plan = runtime.validate("include/rollouts/fraud.yaml", params, None, run_type, "test-run")
        plan["spec"]["connections"] = {"router": router_conn, "prediction_log": "canary_test_log"}
        plan["spec"].update(spec_changes)
        return plan

    return make


def _predict(gateway, n, amount=40.0):
    """``n`` real prediction requests to the gateway (all on stable while no canary share is set)."""
    import requests

    s = requests.Session()
    for i in range(n):
        feats = {"amount": amount + i % 7, "hour": 13.0, "account_age_days": 300.0, "tx_last_24h": 2.0,
                 "merchant_risk": 0.2, "country": 1.0, "distance_km": 5.0}
        s.post(f"{gateway.url}/v1/models/fraud/predict", json={"unit_id": f"u{i}", "features": feats},
               timeout=10).raise_for_status()


@pytest.fixture
def stable_traffic(gateway):
    """The baseline pre-flight needs: min(hold.min_samples, 20) = 20 stable requests within the last hour."""
    _predict(gateway, runtime.BASELINE_MIN_REQUESTS)


@pytest.mark.parametrize("sent", [0, runtime.BASELINE_MIN_REQUESTS - 1])
def test_preflight_refuses_without_recent_stable_traffic_and_says_how_to_fix(make_plan, gateway, router_conn,
                                                                              sent):
    _predict(gateway, sent)
    before = TrafficRouterHook(router_conn).get_route("fraud")
    with pytest.raises(AirflowFailException) as info:
        runtime.preflight(make_plan({"candidate": "v2"}))
    message = str(info.value)
    assert f"stable v1 of 'fraud' served {sent} request(s) in the reference window" in message
    assert "(the last 60 min)" in message and "at least 20" in message
    assert "send traffic to the model" in message and "hold_min_samples" in message
    assert "Nothing was changed" in message
    assert TrafficRouterHook(router_conn).get_route("fraud") == before
    # The requirement follows hold.min_samples: a run asking for few samples per look asks for fewer.
    if sent:
        assert runtime.preflight(make_plan({"candidate": "v2", "hold_min_samples": sent}))["baseline"]["requests"] == sent
        assert TrafficRouterHook(router_conn).get_route("fraud") == before


def test_scheduled_run_picks_the_newest_version_newer_than_stable_or_skips(make_plan, router_conn, stable_traffic):
    hook = TrafficRouterHook(router_conn)
    versions = hook.list_versions("fraud")
    newest = max((v for v in versions if v["version"] != "v1"), key=lambda v: (v["created_at"], v["version"]))
    pre = runtime.preflight(make_plan(run_type="scheduled"))
    assert pre["candidate"] == newest["version"] and pre["stable"] == "v1"

    # Stable is the newest version: nothing to promote tonight, the run is skipped (not failed).
    g = hook.get_route("fraud").generation
    hook.set_route("fraud", stable=newest["version"], canary=None, canary_percent=0, if_generation=g)
    with pytest.raises(AirflowSkipException, match="nothing to promote"):
        runtime.preflight(make_plan(run_type="scheduled"))


def test_offline_gate_stops_a_clearly_worse_candidate_with_the_numbers(make_plan, gateway, router_conn):
    broken = gateway.model_dir / "fraud" / "v9"
    shutil.copytree(gateway.model_dir / "fraud" / "v1", broken)
    meta = json.loads((broken / "metadata.json").read_text())
    meta.update(version="v9", stage="candidate", eval_metrics={"accuracy": 0.5, "auc": 0.51, "log_loss": 0.69})
    (broken / "metadata.json").write_text(json.dumps(meta))
    before = TrafficRouterHook(router_conn).get_route("fraud")
    with pytest.raises(AirflowFailException, match=r"worse offline.*auc: stable [0-9.]+ candidate 0.51"):
        runtime.preflight(make_plan({"candidate": "v9"}))
    assert TrafficRouterHook(router_conn).get_route("fraud") == before


def test_power_plan_that_cannot_meet_the_deadline_stops_before_traffic(make_plan, router_conn, stable_traffic):
    plan = make_plan({"candidate": "v2"}, deadline=60)  # holds of 10 min per step cannot finish in a minute
    before = TrafficRouterHook(router_conn).get_route("fraud")
    with pytest.raises(AirflowFailException, match="cannot finish within its deadline"):
        runtime.preflight(plan)
    assert TrafficRouterHook(router_conn).get_route("fraud") == before


def test_set_traffic_is_absolute_retry_safe_and_stops_when_someone_else_moved_the_route(make_plan, router_conn,
                                                                                       stable_traffic):
    plan = make_plan({"candidate": "v2", "steps": [5, 50]})
    pre = runtime.preflight(plan)
    assert "power_plan" in pre and pre["power_plan"]["steps"][0]["percent"] == 5
    first = runtime.set_traffic(plan, pre, 1, None)
    assert first["route"]["canary_percent"] == 5 and first["route"]["generation"] == pre["generation"] + 1
    again = runtime.set_traffic(plan, pre, 1, None)  # a retry: same route, same start, no second change
    assert again == first
    second = runtime.set_traffic(plan, pre, 2, first["route"])
    assert second["route"]["canary_percent"] == 50 and second["route"]["generation"] == first["route"]["generation"] + 1

    hook = TrafficRouterHook(router_conn)
    hook.set_route("fraud", stable="v1", canary="v3", canary_percent=20, lease_seconds=60,
                   if_generation=second["route"]["generation"])
    moved = hook.get_route("fraud")
    with pytest.raises(AirflowFailException, match="someone else changed it"):
        runtime.set_traffic(plan, pre, 2, first["route"])
    # fail-safe leaves another version's canary alone; rollback of our own canary clears it
    out = runtime.fail_safe(plan, None, "test")
    assert out["changed"] is False and hook.get_route("fraud") == moved


def test_rollback_and_promote_are_idempotent(make_plan, router_conn, stable_traffic):
    hook = TrafficRouterHook(router_conn)
    plan = make_plan({"candidate": "v2", "steps": [50]})
    pre = runtime.preflight(plan)
    step = runtime.set_traffic(plan, pre, 1, None)
    verdict = {"decision": "rollback", "reason": "harm shown on error_rate", "metrics": [
        {"name": "error_rate", "harm": True, "stable": 0.001, "canary": 0.05, "diff": 0.049, "z_harm": 5.0,
         "b_rollback": 2.2, "samples": {"stable": 900, "canary": 100}}]}
    for _ in range(2):  # a re-run of rollback finds the canary already at 0 % and still fails with the reason
        with pytest.raises(AirflowFailException, match="harm shown on error_rate"):
            runtime.rollback(plan, pre, verdict)
        route = hook.get_route("fraud")
        assert route.canary_percent == 0 and route.stable == "v1"
    rc = runtime.root_cause(verdict)
    assert rc["failing_metrics"][0]["metric"] == "error_rate" and rc["failing_metrics"][0]["canary"] == 0.05

    pre = runtime.preflight(plan)
    step = runtime.set_traffic(plan, pre, 1, None)
    promoted = runtime.promote(plan, pre, step)
    assert promoted["stable"] == "v2" and promoted["route"]["canary"] is None
    assert runtime.promote(plan, pre, step)["promoted_at"] == promoted["promoted_at"]  # retry: no second change
    assert hook.get_version("fraud", "v2")["stage"] == "production"
    assert hook.get_version("fraud", "v1")["stage"] == "archived"


def test_post_deploy_hold_and_drift_check_after_promotion(make_plan, gateway, router_conn):
    import asyncio
    import time

    from canary.triggers.hold import PostDeployHoldTrigger

    def traffic(n, amount):
        _predict(gateway, n, amount)

    traffic(80, 40.0)
    time.sleep(0.5)
    plan = make_plan({"candidate": "v2", "steps": [50]},
                     post_deploy={"window": 1, "min_samples": 30}, drift={"features": "all", "bins": 5,
                                                                           "psi_floor": 0.1, "sample_size": 1000})
    pre = runtime.preflight(plan)
    assert pre["baseline"]["requests"] == 80 and pre["baseline"]["latency_p95_ms"] > 0
    step = runtime.set_traffic(plan, pre, 1, None)
    promoted = runtime.promote(plan, pre, step)
    traffic(60, 4000.0)  # the inputs moved: amounts a hundred times larger than in the reference window
    time.sleep(0.5)

    async def first(trigger):
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(asyncio.wait_for(first(PostDeployHoldTrigger(
        plan=plan, pre=pre, promoted_at=promoted["promoted_at"], poll_interval=0.3)), 30))
    assert event["status"] == "ok" and event["reason"] == "min_reached"
    assert event["counts"]["stable"]["requests"] >= 60
    post = {**event, "window": [promoted["promoted_at"], event["look_at"]]}
    drift = runtime.drift_check(plan, pre, post)
    assert drift["reference_rows"] == 80 and drift["current_rows"] >= 60
    assert "amount" in drift["drifted"], drift
    assert "hour" not in drift["drifted"]


def test_fail_safe_clears_only_a_route_generation_this_run_wrote(make_plan, router_conn, stable_traffic):
    """The generation check the DAG's failure callback relies on (it reads the generations from the run's
    XComs): the same version re-set by someone else under a new generation is not this run's canary."""
    hook = TrafficRouterHook(router_conn)
    plan = make_plan({"candidate": "v2", "steps": [5, 50]})
    pre = runtime.preflight(plan)
    mine = runtime.set_traffic(plan, pre, 1, None)["route"]
    written = {mine["generation"]: mine["canary_percent"]}
    # a lease expiry, then another rollout of the same version
    hook.set_route("fraud", stable="v1", canary=None, canary_percent=0, if_generation=mine["generation"])
    theirs = hook.set_route("fraud", stable="v1", canary="v2", canary_percent=5, lease_seconds=60,
                            if_generation=mine["generation"] + 1)
    out = runtime.fail_safe(plan, None, "test", generations=written)
    assert out["changed"] is False and hook.get_route("fraud") == theirs
    # the same generation with another share is not what this run wrote either
    out = runtime.fail_safe(plan, None, "test", generations={theirs.generation: 50.0})
    assert out["changed"] is False and hook.get_route("fraud") == theirs
    # at a generation and share the run wrote, the canary is cleared
    out = runtime.fail_safe(plan, None, "test", generations={theirs.generation: 5.0})
    assert out["changed"] is True and hook.get_route("fraud").canary_percent == 0
