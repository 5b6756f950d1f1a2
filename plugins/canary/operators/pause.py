"""The human decision after ``on_inconclusive: pause``: a person chooses promote or roll back.

A step still inconclusive at its cap cannot be decided by the numbers; with ``on_inconclusive: pause`` the
``pause`` task keeps the canary's share (its lease extended over the decision window) and notifies the
owners, and this task asks them in Airflow's *Required actions* (Human-in-the-loop, Airflow 3.1+). On
Airflow 3.3 the task waits in the ``awaiting_input`` state: no worker slot and no trigger are held.

The decision window is the run's ``hold.max_wait`` (the trigger form's ``hold_max_wait`` can change it per
run), read from the plan at run time. Without an answer in time the scheduler applies the default,
**Roll back**: an unattended canary never becomes stable. The answer (who, when, or that it timed out) is
pushed as XCom ``answer`` for the rollback's reason and the report.

Imported only by DAGs whose spec pauses (it pulls in the standard provider's HITL module).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator

PROMOTE = "Promote"
ROLL_BACK = "Roll back"

__all__ = ["PauseDecisionOperator", "PROMOTE", "ROLL_BACK"]


class PauseDecisionOperator(HITLBranchOperator):
    """Ask a person to promote or roll back a paused canary; the default on timeout is roll back.

    :param promote_task_id: the task the **Promote** answer follows (the DAG's ``promote``).
    :param rollback_task_id: the task the **Roll back** answer (and the timeout default) follows.
    """

    def __init__(self, *, promote_task_id: str = "promote", rollback_task_id: str = "rollback", **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Canary rollout paused: promote or roll back?")
        kwargs.setdefault("body", "A traffic step was still inconclusive at its cap. The pause task's log and the "
                                  "last analyze task's decision record hold the evidence.")
        super().__init__(
            options=[PROMOTE, ROLL_BACK],
            defaults=[ROLL_BACK],
            multiple=False,
            options_mapping={PROMOTE: promote_task_id, ROLL_BACK: rollback_task_id},
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        from canary import runtime

        plan = context["ti"].xcom_pull(task_ids="validate")
        paused = context["ti"].xcom_pull(task_ids="pause") or {}
        if not plan:
            raise RuntimeError("no XCom from task 'validate': PauseDecisionOperator runs inside a canary "
                               "rollout DAG after 'pause' (Contract 4); check the DAG wiring")
        window = runtime.hold_settings(plan).max_wait_s
        self.response_timeout = timedelta(seconds=window)
        self.subject, self.body = runtime.pause_question(plan, paused, window)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        chosen = list(event.get("chosen_options") or [])
        user = event.get("responded_by_user") or {}
        answered_at = event.get("responded_at")
        context["ti"].xcom_push(key="answer", value={
            "chosen": chosen[0] if chosen else None,
            "timed_out": bool(event.get("timedout")) or "error" in event,
            "responded_by": (user.get("name") or user.get("id")) if isinstance(user, dict) else str(user),
            "responded_at": answered_at.isoformat() if hasattr(answered_at, "isoformat") else answered_at,
        })
        return super().execute_complete(context, event)
