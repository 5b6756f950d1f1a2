"""The analyze loop of one traffic step: look, and while the verdict is `extend`, defer and look again.

Look times are planned, not taken from the clock at run time: look 0 is the hold's recorded ``look_at``,
look k is ``look_0 + k * interval`` (interval = the hold's ``min_duration``, at least its poll interval),
capped at ``step_started_at + max_wait``. A retry therefore replays the same windows and reaches the same
verdict; a look whose time has passed runs at once instead of waiting again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator


def _pull(context: Any, task_id: str, *, required: bool = True) -> Any:
    value = context["ti"].xcom_pull(task_ids=task_id)
    if value is None and required:
        raise RuntimeError(
            f"no XCom from task {task_id!r}: AnalyzeOperator runs inside a canary rollout DAG after that task "
            "(Contract 4); check the DAG wiring"
        )
    return value


class AnalyzeOperator(BaseOperator):
    """Judge step ``step_index`` (1-based) on the recorded windows; the verdict dict goes to XCom.

    The decision record (a readable text) goes to the task log. While the verdict is ``extend`` and the
    step's ``hold.max_wait`` is not reached, the task defers (renewing the lease) and looks again; at the
    cap it returns the ``extend`` verdict and the ``decide`` branch applies ``on_inconclusive``.

    XCom: ``{"verdict", "history", "record", "look_at", "looks" (every look: ``look_at``, ``verdict``,
    ``record``), "look_count", "step_index", "at_cap"}``.

    :param task_id: the task id inside the step's task group (``analyze``).
    :param step_index: 1-based index of the traffic step to judge.
    """

    template_fields: Sequence[str] = ("step_index",)

    def __init__(self, *, task_id: str, step_index: int, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)
        self.step_index = step_index

    # -- inputs ---------------------------------------------------------------------------------------

    def _inputs(self, context: Any) -> dict[str, Any]:
        i = int(self.step_index)
        plan = _pull(context, "validate")
        pre = _pull(context, "preflight")
        steps = []
        for j in range(1, i + 1):
            st = _pull(context, f"step_{j}.set_traffic")
            hold = _pull(context, f"step_{j}.hold")
            look_at = hold["look_at"]
            if j < i:
                earlier = _pull(context, f"step_{j}.analyze", required=False)
                if earlier and earlier.get("look_at"):
                    look_at = earlier["look_at"]  # the step's last look (after any extends)
            steps.append(
                {
                    "step_index": j,
                    "percent": st.get("percent"),
                    "step_started_at": st["step_started_at"],
                    "look_at": look_at,
                    "hold_reason": hold.get("reason"),
                    "breaker": hold.get("breaker"),
                }
            )
        history = None
        if i > 1:
            prev = _pull(context, f"step_{i - 1}.analyze", required=False)
            history = (prev or {}).get("history")
        return {"plan": plan, "pre": pre, "steps": steps, "history": history,
                "generation": int(_pull(context, f"step_{i}.set_traffic")["route"]["generation"])}

    def _renew(self, plan: dict[str, Any], pre: dict[str, Any], generation: int) -> None:
        """Best effort: keep the lease alive while judging (data quality and drift take seconds). A route
        that moved is not this task's to judge: the next ``set_traffic`` refuses it with a clear error."""
        from canary import runtime
        from canary.hooks.errors import GatewayError

        try:
            runtime.renew_lease(plan, pre, generation)
        except GatewayError as exc:
            self.log.warning("could not renew the lease of step %s before judging: %s", self.step_index, exc)

    # -- the loop -------------------------------------------------------------------------------------

    def execute(self, context: Any) -> Any:
        """Look 0 at the hold's recorded look time."""
        return self._look(context, look=0, history=None, first=True, looks=[])

    def look_again(self, context: Any, event: dict[str, Any] | None = None, look: int = 1,
                   history: dict[str, Any] | None = None, looks: list[dict[str, Any]] | None = None) -> Any:
        """Resume after an ``extend`` wait: the next planned look."""
        from airflow.sdk.exceptions import AirflowException

        if not event or event.get("status") != "ok":
            raise AirflowException(
                f"waiting to look again at step {self.step_index} failed: "
                f"{(event or {}).get('error_type', 'error')}: {(event or {}).get('message')}"
            )
        carry = event.get("carry") or {}
        if carry:  # the trigger hands the loop's state back (next_kwargs may be replaced by the event)
            look, history, looks = int(carry["look"]), carry.get("history"), carry.get("looks")
        return self._look(context, look=look, history=history, first=False, looks=list(looks or []))

    def _look(
        self, context: Any, *, look: int, history: dict[str, Any] | None, first: bool, looks: list[dict[str, Any]]
    ) -> Any:
        from canary import runtime
        from canary.hooks.timeutil import iso, parse_ts, utcnow
        from canary.triggers.hold import LookAgainTrigger

        inp = self._inputs(context)
        plan, pre, steps = inp["plan"], inp["pre"], inp["steps"]
        settings = runtime.hold_settings(plan)
        current = steps[-1]
        look0 = parse_ts(current["look_at"])
        cap = parse_ts(current["step_started_at"]) + timedelta(seconds=settings.max_wait_s)
        interval = max(settings.min_duration_s, settings.poll_interval_s, 1.0)
        look_at = look0 if look == 0 else min(look0 + timedelta(seconds=look * interval), max(cap, look0))
        steps[-1] = {**current, "look_at": iso(look_at)}
        hist = inp["history"] if first else history
        self._renew(plan, pre, inp["generation"])

        while True:
            at_cap = look_at >= cap
            result = runtime.analyze(plan, pre, steps, hist, final_look=at_cap)
            decision = result["verdict"]["decision"]
            # an extend at the cap, or one no later look can turn into a promotion (the judge's ``final``),
            # ends the step: the record says so, not "keep holding"
            ends = decision == "extend" and (at_cap or bool(result["verdict"].get("final")))
            if ends:
                applies = plan["spec"].get("on_inconclusive", "rollback")
                why = (f"the step reached its cap (max_wait {settings.max_wait_s:.0f}s)" if at_cap else
                       "no later look can promote (all promotion alpha spent)")
                result["verdict"] = {**result["verdict"], "final": True,
                                     "reason": f"inconclusive, {why}: on_inconclusive={applies} applies; "
                                               + result["verdict"]["reason"]}
                result["record"] += f"\nINCONCLUSIVE -> {applies.upper()}: {why}; the spec's on_inconclusive applies"
            looks.append({"look_at": iso(look_at), "verdict": result["verdict"], "record": result["record"]})
            self.log.info("decision record, step %s, look %d of this step (the record counts the run's looks):"
                          "\n%s", self.step_index, look + 1, result["record"])
            if decision != "extend" or ends:
                return {**result, "look_at": iso(look_at), "looks": looks, "look_count": look + 1,
                        "step_index": int(self.step_index), "at_cap": bool(at_cap)}
            look += 1
            hist = result["history"]
            next_at = min(look0 + timedelta(seconds=look * interval), cap)
            steps[-1] = {**current, "look_at": iso(next_at)}
            if next_at <= utcnow():
                look_at = next_at  # replaying a look whose time has passed (a retry): no wait
                continue
            self.log.info("verdict extend at step %s: looking again at %s", self.step_index, iso(next_at))
            self.defer(
                trigger=LookAgainTrigger(
                    plan=plan, pre=pre, generation=inp["generation"], since=iso(look_at),
                    seconds=(next_at - look_at).total_seconds(),
                    carry={"look": look, "history": hist, "looks": looks},
                ),
                method_name="look_again",
                kwargs={"look": look, "history": hist, "looks": looks},
                timeout=timedelta(seconds=(next_at - look_at).total_seconds() + 300),
            )
