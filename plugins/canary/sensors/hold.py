"""Hold sensors: wait for minimum time AND minimum samples per arm, capped by the maximum wait.

Both sensors pull their inputs from upstream XComs by the fixed task ids of Contract 4 (`validate`,
`preflight`, `step_<i>.set_traffic`, `promote`) and create their hooks in `execute`, never in `__init__`.
Deferrable by default: ``execute`` polls once and, when the hold is not over, defers to a trigger that
polls on the triggerer (renewing the route's lease) and wakes the task with the recorded look time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

#: Extra time on top of the hold's max wait before Airflow times the deferral out.
_DEFER_GRACE_S = 300


def _pull(context: Any, task_id: str, *, required: bool = True) -> Any:
    value = context["ti"].xcom_pull(task_ids=task_id)
    if value is None and required:
        raise RuntimeError(
            f"no XCom from task {task_id!r}: this sensor runs inside a canary rollout DAG after that task "
            "(Contract 4); check the DAG wiring"
        )
    return value


def _raise_on_error(event: dict[str, Any] | None, what: str) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    if not event:
        raise AirflowException(f"{what}: the trigger ended without an event")
    if event.get("status") != "ok" and event.get("error_type") == "RouteConflictError":
        # Not retryable: the route is no longer the one this run wrote (someone else, or the lease expired).
        raise AirflowFailException(f"{what} stopped: {event.get('message')}")
    if event.get("status") != "ok":
        raise AirflowException(
            f"{what} failed: {event.get('error_type', 'error')}: {event.get('message')}. The run fails safe: "
            "fail_safe sets the canary share to 0 % when the gateway answers, and the route's lease returns "
            "traffic to stable otherwise."
        )
    return event


class HoldSensor(BaseSensorOperator):
    """Hold traffic step ``step_index`` (1-based) until the look is due, then record the look time.

    Over when: ``hold.min_duration`` has passed since the step started AND each arm has ``hold.min_samples``
    requests (and, with label metrics, that many predictions whose labels had time to arrive); or
    ``hold.max_wait`` is reached; or the circuit breaker fires. XCom: ``{"look_at", "reason", "counts",
    "elapsed_s", "breaker"}``.

    :param task_id: the task id inside the step's task group (``hold``).
    :param step_index: 1-based index of the traffic step this hold belongs to.
    :param deferrable: defer to :class:`canary.triggers.hold.HoldTrigger` (default) instead of poking.
    """

    template_fields: Sequence[str] = ("step_index",)

    def __init__(self, *, task_id: str, step_index: int, deferrable: bool = True, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)
        self.step_index = step_index
        self.deferrable = deferrable

    def _inputs(self, context: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        plan = _pull(context, "validate")
        pre = _pull(context, "preflight")
        step = _pull(context, f"step_{int(self.step_index)}.set_traffic")
        return plan, pre, step

    def _check(self, context: Any) -> Any:
        from canary.hooks.errors import RouteConflictError
        from canary.triggers.hold import check_hold

        plan, pre, step = self._inputs(context)
        try:
            return check_hold(
                plan=plan,
                pre=pre,
                step_index=int(self.step_index),
                step_started_at=step["step_started_at"],
                generation=int(step["route"]["generation"]),
            )
        except RouteConflictError as exc:
            _raise_on_error({"status": "error", "error_type": "RouteConflictError", "message": str(exc)},
                            f"hold of step {self.step_index}")
            raise

    def poke(self, context: Any) -> PokeReturnValue:
        """Non-deferrable mode: one poll; done carries the same XCom as the deferred path."""
        result = self._check(context)
        if result.done:
            self.log.info(self._summary(result.to_event()))
        else:
            self.log.info("hold of step %s: %s", self.step_index, result.reason)
        return PokeReturnValue(is_done=result.done, xcom_value=result.to_event() if result.done else None)

    def execute(self, context: Any) -> Any:
        """Poll once; if the hold is not over, defer to the trigger."""
        if not self.deferrable:
            return super().execute(context)
        from canary import runtime
        from canary.triggers.hold import HoldTrigger

        result = self._check(context)
        if result.done:
            event = result.to_event()
            self.log.info(self._summary(event))
            return event
        plan, pre, step = self._inputs(context)
        settings = runtime.hold_settings(plan)
        self.log.info("hold of step %s: %s; deferring", self.step_index, result.reason)
        self.defer(
            trigger=HoldTrigger(
                plan=plan,
                pre=pre,
                step_index=int(self.step_index),
                step_started_at=step["step_started_at"],
                generation=int(step["route"]["generation"]),
                poll_interval=settings.poll_interval_s,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=settings.max_wait_s + _DEFER_GRACE_S),
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: fail on an error event, else the event is the XCom."""
        event = _raise_on_error(event, f"hold of step {self.step_index}")
        self.log.info(self._summary(event))
        return event

    def _summary(self, event: dict[str, Any]) -> str:
        c = event.get("counts", {})
        text = (
            f"hold of step {self.step_index} over ({event.get('reason')}) after {event.get('elapsed_s', 0):.1f}s: "
            f"look at {event.get('look_at')}; stable {c.get('stable', {}).get('requests', 0)} requests "
            f"({c.get('stable', {}).get('labelled', 0)} labelled), canary {c.get('canary', {}).get('requests', 0)} "
            f"requests ({c.get('canary', {}).get('labelled', 0)} labelled)"
        )
        if event.get("breaker"):
            text += f"; circuit breaker: {event['breaker']}"
        return text


class PostDeployHoldSensor(BaseSensorOperator):
    """After promotion, wait ``post_deploy.window`` and ``post_deploy.min_samples`` on the new stable.

    XCom: ``{"look_at", "reason", "counts", "elapsed_s", "window": [promoted_at, look_at]}``, the window the
    drift check compares against the pre-rollout reference.

    :param task_id: the task id (``post_deploy_hold``).
    :param deferrable: defer to :class:`canary.triggers.hold.PostDeployHoldTrigger` (default).
    """

    template_fields: Sequence[str] = ()

    def __init__(self, *, task_id: str, deferrable: bool = True, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)
        self.deferrable = deferrable

    def _inputs(self, context: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
        plan = _pull(context, "validate")
        pre = _pull(context, "preflight")
        promoted = _pull(context, "promote")
        return plan, pre, promoted["promoted_at"]

    def _event(self, event: dict[str, Any], promoted_at: str) -> dict[str, Any]:
        out = dict(event)
        out["window"] = [promoted_at, event["look_at"]]
        self.log.info(
            "post-deployment hold over (%s) after %.1fs: %s requests on the new stable; window %s .. %s",
            event.get("reason"), event.get("elapsed_s", 0.0),
            event.get("counts", {}).get("stable", {}).get("requests", 0), promoted_at, event["look_at"],
        )
        return out

    def poke(self, context: Any) -> PokeReturnValue:
        """Non-deferrable mode: one poll."""
        from canary.triggers.hold import check_post_deploy

        plan, pre, promoted_at = self._inputs(context)
        result = check_post_deploy(plan=plan, pre=pre, promoted_at=promoted_at)
        value = self._event(result.to_event(), promoted_at) if result.done else None
        return PokeReturnValue(is_done=result.done, xcom_value=value)

    def execute(self, context: Any) -> Any:
        """Poll once; if the window is not complete, defer to the trigger."""
        if not self.deferrable:
            return super().execute(context)
        from canary import runtime
        from canary.triggers.hold import PostDeployHoldTrigger, check_post_deploy

        plan, pre, promoted_at = self._inputs(context)
        result = check_post_deploy(plan=plan, pre=pre, promoted_at=promoted_at)
        if result.done:
            return self._event(result.to_event(), promoted_at)
        window_s, _ = runtime.post_deploy_settings(plan)
        self.log.info("post-deployment hold: %s; deferring", result.reason)
        self.defer(
            trigger=PostDeployHoldTrigger(
                plan=plan, pre=pre, promoted_at=promoted_at,
                poll_interval=runtime.hold_settings(plan).poll_interval_s,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=2 * window_s + 60 + _DEFER_GRACE_S),
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger."""
        event = _raise_on_error(event, "post-deployment hold")
        _, _, promoted_at = self._inputs(context)
        return self._event(event, promoted_at)
