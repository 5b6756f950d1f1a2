"""One notification per outcome: whole runs with dag.test() against the real gateway and a real webhook
receiver on loopback.

- a rolled-back run is told once, as a rollback (the run still ends failed, with the reason);
- a run that crashed while its canary was live is told once, as a failure, and the canary is at 0 %.
"""

from __future__ import annotations

from typing import Any


def _events(webhook: Any) -> list[str]:
    return [body["event"] for body in webhook.received]


def _crash_hold(on_hold: Any = None) -> Any:
    """Instrument: step 1's hold fails once the canary is live (after ``on_hold()`` if given)."""

    def execute(context: Any) -> Any:
        if on_hold is not None:
            on_hold()
        raise RuntimeError("injected: the hold crashed while the canary was live")

    return execute


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
