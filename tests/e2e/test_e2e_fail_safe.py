"""One notification per outcome, and a fail-safe that takes exactly this run's canary off the route.

Whole runs with dag.test() against the real gateway and a real webhook receiver on loopback:

- a rolled-back run is told once, as a rollback (the run still ends failed, with the reason);
- a run that crashed while its canary was live is told once, as a failure, and the canary is at 0 %;
- a scheduled run (the candidate chosen by pre-flight, nothing in the run's conf) whose ``fail_safe`` task
  never ran (as after a run timeout): the DAG's failure callback finds this run's candidate and generation
  in the run's XComs, clears its canary and tells the failure once; a route someone else moved to another
  canary meanwhile is left exactly as it is.

``dag.test()`` only makes manual runs, so the scheduled runs replace the ``validate`` task's callable with
the same ``runtime.validate`` call a scheduled run makes (``run_type="scheduled"``, no candidate).
"""

from __future__ import annotations

from typing import Any

import pytest


def _events(webhook: Any) -> list[str]:
    return [body["event"] for body in webhook.received]


def _crash_hold(on_hold: Any = None) -> Any:
    """Instrument: step 1's hold fails once the canary is live (after ``on_hold()`` if given)."""

    def execute(context: Any) -> Any:
        if on_hold is not None:
            on_hold()
        raise RuntimeError("injected: the hold crashed while the canary was live")

    return execute


def _as_scheduled(dag: Any) -> None:
    from canary import runtime

    def validate(spec_path: str, **context: Any) -> dict[str, Any]:
        return runtime.validate(spec_path, {}, context.get("logical_date"), "scheduled", context.get("run_id"))

    dag.get_task("validate").python_callable = validate


def _fail_safe_never_ran(dag: Any) -> None:
    """As after a run timeout: the fail_safe task does nothing (no route change, no notification)."""

    def killed(**_context: Any) -> None:
        raise RuntimeError("injected: the fail_safe task was killed before it could do anything")

    dag.get_task("fail_safe").python_callable = killed


def test_rollback_is_notified_once_as_a_rollback(make_stack, webhook, webhook_rollouts):
    stack = make_stack("sqlite", rollouts=webhook_rollouts)
    stack.start_traffic()
    result = stack.run({"candidate": "v4"})  # NaN scores: data quality rolls it back at its first look
    assert result.state == "failed" and result.states["rollback"] == "failed", result.summary()
    assert result.states["fail_safe"] == "failed", result.summary()  # the run still ends failed
    assert _events(webhook) == ["rollback"], webhook.received
    body = webhook.received[0]
    assert body["candidate"] == "v4" and body["decision"] == "rollback"
    assert body["reason"] == result.xcoms["rollback:rollback"]["reason"]
    assert result.xcoms["fail_safe:fail_safe"]["notified"] is None
    assert stack.route()["canary_percent"] == 0


def test_crashed_run_is_notified_once_as_a_failure(make_stack, webhook, webhook_rollouts):
    stack = make_stack("sqlite", rollouts=webhook_rollouts)
    stack.start_traffic()
    result = stack.run({"candidate": "v2"},
                       instrument=lambda dag: setattr(dag.get_task("step_1.hold"), "execute", _crash_hold()))
    assert result.state == "failed" and result.states["step_1.hold"] == "failed", result.summary()
    assert result.xcoms["fail_safe:fail_safe"]["changed"] is True
    # the fail_safe task told the owners; the DAG's failure callback, which runs next, does not tell them again
    assert _events(webhook) == ["failure"], webhook.received
    assert webhook.received[0]["candidate"] == "v2" and webhook.received[0]["decision"] == "fail_safe"
    route = stack.route()
    assert route["canary_percent"] == 0 and route["stable"] == "v1", route


def test_scheduled_run_callback_clears_exactly_its_own_canary(make_stack, webhook, webhook_rollouts):
    stack = make_stack("sqlite", rollouts=webhook_rollouts)
    stack.start_traffic()
    seen: dict[str, Any] = {}

    def instrument(dag: Any) -> None:
        _as_scheduled(dag)
        _fail_safe_never_ran(dag)
        dag.get_task("step_1.hold").execute = _crash_hold(lambda: seen.setdefault("live", stack.route()))

    result = stack.run({}, instrument=instrument)
    assert result.state == "failed", result.summary()
    candidate = result.xcoms["preflight"]["candidate"]
    assert result.xcoms["validate"]["candidate"] is None and candidate != "v1"
    assert seen["live"]["canary"] == candidate and seen["live"]["canary_percent"] == 10, seen
    route = stack.route()
    assert route["canary_percent"] == 0 and route["canary"] is None and route["stable"] == "v1", route
    assert route["generation"] == seen["live"]["generation"] + 1, "one change: the callback's"
    assert _events(webhook) == ["failure"], webhook.received
    assert webhook.received[0]["candidate"] == candidate


@pytest.mark.parametrize("version", ["another", "same"])
def test_scheduled_run_callback_leaves_a_canary_it_did_not_write_alone(make_stack, webhook, webhook_rollouts,
                                                                       version):
    """While this run's canary is live someone takes the route over: another version's canary, or this run's
    own version under a new generation (as another rollout of the same version would after a lease expiry).
    The callback recognises neither as this run's and changes nothing."""
    stack = make_stack("sqlite", rollouts=webhook_rollouts)
    stack.start_traffic()
    taken: dict[str, Any] = {}

    def take_over() -> None:
        live = stack.route()
        taken["live"] = live
        canary = live["canary"] if version == "same" else ("v3" if live["canary"] != "v3" else "v2")
        for percent in (0, 5) if version == "same" else (5,):
            resp = stack.gateway.set_route("fraud", stable="v1", canary=canary if percent else None,
                                           canary_percent=percent, mode="split",
                                           **({"lease_seconds": 300} if percent else {}),
                                           if_generation=stack.route()["generation"])
            assert resp.status_code == 200, resp.text
        taken["route"] = stack.route()

    def instrument(dag: Any) -> None:
        _as_scheduled(dag)
        _fail_safe_never_ran(dag)
        dag.get_task("step_1.hold").execute = _crash_hold(take_over)

    result = stack.run({}, instrument=instrument)
    assert result.state == "failed", result.summary()
    candidate = result.xcoms["preflight"]["candidate"]
    assert taken["live"]["canary"] == candidate, taken
    assert (taken["route"]["canary"] == candidate) == (version == "same"), taken
    assert taken["route"]["canary_percent"] == 5
    assert stack.route() == taken["route"], "the callback changed a route this run did not write"
    # The failure is still told once (by the callback: the fail_safe task never ran).
    assert _events(webhook) == ["failure"], webhook.received
