"""The imperative shell of one rollout run (Contract 4): every task body of the DAG is one call in here.

Each function takes the resolved *plan* (the JSON dict returned by :func:`validate`, kept in XCom under the
task id ``validate``) plus what it needs from upstream XComs, and returns a JSON-serialisable dict that
becomes its XCom. The DAG file and :mod:`canary.dag_factory` hold no logic and call only these functions.

Import discipline: this module is imported by the DAG file at parse time, so it must stay cheap. Hooks,
pandas, scipy, Great Expectations and the judge are imported *inside* the function bodies, never at module
level (``benchmarks/parse_time.py`` checks ``sys.modules``).

Task ids used to pull upstream XComs (fixed by Contract 4, steps 1-based): ``validate``, ``preflight``,
``step_<i>.set_traffic``, ``step_<i>.hold``, ``step_<i>.analyze``, ``step_<i>.decide``, ``rollback``,
``pause``, ``promote``, ``post_deploy_hold``, ``drift_check``, ``report``, ``fail_safe``.

Bodies other than :func:`validate`, :func:`decide` and :func:`latest_analysis` arrive with issue 5 (the
runtime engineer); until then they raise ``NotImplementedError`` so no task reports success it did not earn.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = [
    "validate",
    "resolve_candidate",
    "preflight",
    "set_traffic",
    "analyze",
    "decide",
    "latest_analysis",
    "rollback",
    "pause",
    "promote",
    "drift_check",
    "report",
    "fail_safe",
    "PLAN_VERSION",
    "MANUAL_RUN_TYPES",
]

#: Bumped when the shape of the plan dict changes, so a runtime function can refuse a stale plan.
PLAN_VERSION = 1

#: Run types for which a candidate must be given (triggered by hand: the UI form or the REST API).
MANUAL_RUN_TYPES = frozenset({"manual"})


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _run_type_name(run_type: Any) -> str:
    """``DagRunType.MANUAL`` / ``"manual"`` / None -> ``"manual"``-style lower-case string."""
    if run_type is None:
        return "manual"
    value = getattr(run_type, "value", run_type)
    return str(value).lower()


def validate(
    spec_path: str,
    params: dict[str, Any] | None,
    logical_date: Any = None,
    run_type: Any = "manual",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Load the spec, merge the trigger params, validate both, and return the plan of this run.

    Nothing touches traffic before this passes. Errors raise :class:`canary.spec.SpecError` listing every
    problem at once (file, field, value, fix); the task fails without retries being useful, so the factory
    gives ``validate`` no retries.

    :param spec_path: path of the rollout spec YAML.
    :param params: the DAG run's params (trigger form / ``conf``); ``None`` means none given.
    :param logical_date: the run's logical date (datetime or ISO string, may be None for manual runs).
    :param run_type: ``manual`` (UI or REST API), ``scheduled``, ``asset_triggered`` or ``backfill``.
        A candidate is required for manual runs; scheduled runs may leave it empty and preflight picks the
        newest registered version newer than stable.
    :param run_id: the DAG run id, recorded in the plan for reports and notifications.
    :returns: the plan: ``{"plan_version", "spec" (resolved spec as a dict, see
        :meth:`canary.spec.RolloutSpec.to_dict`), "candidate" (str or None), "run_id", "run_type",
        "logical_date", "spec_path", "overrides" (the params that changed the spec)}``.
    """
    from canary.spec import load_spec

    kind = _run_type_name(run_type)
    spec = load_spec(spec_path, params=params, require_candidate=kind in MANUAL_RUN_TYPES)
    return {
        "plan_version": PLAN_VERSION,
        "spec": spec.to_dict(),
        "candidate": spec.candidate,
        "run_id": run_id,
        "run_type": kind,
        "logical_date": _iso(logical_date),
        "spec_path": str(spec_path),
        "overrides": dict(spec.overrides),
    }


def resolve_candidate(plan: dict[str, Any], versions: list[dict[str, Any]], stable: str) -> str | None:
    """The candidate of this run: the plan's, or for a scheduled run the newest registered version newer
    than ``stable`` (by ``created_at``); ``None`` when there is none (preflight then skips the run).

    Raises ``ValueError`` when the candidate equals stable (only knowable here, at preflight).

    :param plan: the plan from :func:`validate`.
    :param versions: the model's versions as in ``GET /v1/models`` (Contract 1).
    :param stable: the stable version from the current route.
    """
    raise NotImplementedError(
        "resolve_candidate arrives with issue 5: it reads the registry through TrafficRouterHook"
    )


def preflight(plan: dict[str, Any]) -> dict[str, Any]:
    """Check the candidate before any traffic moves and record the baseline.

    Checks: the candidate exists and is loadable, candidate != stable, the offline eval gate, the route is
    as expected (no canary share already), and computes the power plan.

    :returns: ``{"stable", "candidate", "generation", "rollout_started_at", "baseline": {"latency_p95_ms",
        "base_rates": {metric: rate}, "reference_window": [start, end]}, "power_plan"}``.
    :raises AirflowSkipException: a scheduled run finds no version newer than stable.
    """
    raise NotImplementedError(
        "preflight arrives with issue 5: it needs TrafficRouterHook and PredictionLogHook"
    )


def set_traffic(
    plan: dict[str, Any], pre: dict[str, Any], step_index: int, last_route: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Set the canary share of step ``step_index`` (1-based): absolute, idempotent, with a lease,
    compare-and-set on the generation seen in ``last_route`` (or ``pre`` for step 1).

    :returns: ``{"route": <route after the change>, "step_started_at": <the gateway's updated_at>,
        "percent", "step_index"}`` (a retry that finds the route already set returns the same time).
    """
    raise NotImplementedError(
        "set_traffic arrives with issue 5: it needs TrafficRouterHook (PUT /v1/models/{model}/route)"
    )


def analyze(
    plan: dict[str, Any],
    pre: dict[str, Any],
    steps_so_far: list[dict[str, Any]],
    history: dict[str, Any] | None,
) -> dict[str, Any]:
    """One look: aggregate the recorded windows of every step so far, run the judge, write the record.

    :param steps_so_far: per step up to the current one: ``{"step_index", "percent", "step_started_at",
        "look_at"}`` from the ``set_traffic`` and ``hold`` XComs (windows are recorded times, never now()).
    :param history: the look history of earlier looks (JSON, see ``canary.analysis.LookHistory``).
    :returns: ``{"verdict": Verdict.to_dict(), "history": LookHistory.to_dict(), "record": <text>}``.
    """
    raise NotImplementedError(
        "analyze arrives with issue 5: it needs PredictionLogHook and the judge of issue 4"
    )


def decide(
    plan: dict[str, Any], step_index: int, analysis: dict[str, Any] | None, dag_steps: int | None = None
) -> str:
    """The branch of step ``step_index``: which task runs next, from the step's analysis XCom.

    ``advance`` goes to the next step's ``set_traffic`` (``promote`` after the last step only when the
    verdict is ``promote``); ``rollback`` goes to the rollback path; an ``extend`` that reached its cap
    (the analyze task only returns ``extend`` at the cap) and any verdict that does not fit the step
    (``advance`` at the last step, or an unknown decision) follow the spec's ``on_inconclusive``.

    The trigger params may shorten the steps (never lengthen them): the DAG then has ``dag_steps`` step
    groups but the run's last step is ``len(plan["spec"]["steps"])``, and promotion goes through that
    step's ``to_promote`` gate.

    :returns: the task id to follow: ``step_<i+1>.set_traffic``, ``promote``, or a per-step gate
        ``step_<i>.to_promote`` / ``step_<i>.to_rollback`` / ``step_<i>.to_pause`` in front of the shared
        ``promote``, ``rollback`` and ``pause`` tasks (a branch may only skip its direct downstream tasks,
        so every step reaches the shared tasks through its own gate).
    """
    steps = plan["spec"]["steps"]
    n = len(steps)
    dag_steps = n if dag_steps is None else dag_steps
    if not 1 <= step_index <= n:
        raise ValueError(f"step_index={step_index} is outside 1..{n}: the plan has {n} steps")
    verdict = (analysis or {}).get("verdict") or {}
    decision = verdict.get("decision")
    last = step_index == n
    group = f"step_{step_index}"
    if decision == "rollback":
        return f"{group}.to_rollback"
    if decision == "promote" and last:
        return "promote" if step_index == dag_steps else f"{group}.to_promote"
    if decision in ("advance", "promote") and not last:
        return f"step_{step_index + 1}.set_traffic"
    inconclusive = plan["spec"].get("on_inconclusive", "rollback")
    return f"{group}.to_pause" if inconclusive == "pause" else f"{group}.to_rollback"


def latest_analysis(analyses: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The analysis of the latest step that ran, from the ``step_<i>.analyze`` XComs in step order
    (``None`` for steps that did not run)."""
    for analysis in reversed(list(analyses or [])):
        if analysis:
            return analysis
    return None


def rollback(plan: dict[str, Any], pre: dict[str, Any], verdict: dict[str, Any] | None) -> dict[str, Any]:
    """Canary to 0 % (compare-and-set), root-cause record, notify; then raise ``AirflowFailException``
    with the verdict's reason so the run ends failed and says why."""
    raise NotImplementedError("rollback arrives with issue 5: it needs TrafficRouterHook and canary.notify")


def pause(plan: dict[str, Any], pre: dict[str, Any], verdict: dict[str, Any] | None) -> dict[str, Any]:
    """``on_inconclusive: pause`` at the cap: keep the current share under its lease (the gateway returns
    traffic to stable when the lease runs out), notify the owners with the evidence, promote nothing."""
    raise NotImplementedError("pause arrives with issue 5: it needs TrafficRouterHook and canary.notify")


def promote(plan: dict[str, Any], pre: dict[str, Any]) -> dict[str, Any]:
    """stable := candidate at 100 %, canary cleared, registry stage ``production``; the task emits the
    outlet Asset ``canary://<model>/promoted``.

    :returns: ``{"route", "promoted_at", "stable", "previous_stable"}``.
    """
    raise NotImplementedError("promote arrives with issue 5: it needs TrafficRouterHook and the registry")


def drift_check(plan: dict[str, Any], pre: dict[str, Any], post: dict[str, Any] | None) -> dict[str, Any]:
    """Drift of the new stable's inputs and scores over the post-deployment window against the
    pre-rollout reference window (PSI with a sample-size-calibrated threshold, JS, KS)."""
    raise NotImplementedError("drift_check arrives with issue 5: it needs PredictionLogHook and issue 4")


def report(plan: dict[str, Any] | None, **upstream: Any) -> dict[str, Any]:
    """The final HTML report of the run (trigger rule ``all_done``: runs after success, rollback or
    failure). ``upstream`` holds whatever XComs exist (``pre``, ``analyses``, ``promoted``, ``drift``).

    :returns: ``{"path": <path of the HTML report>}``.
    """
    raise NotImplementedError("report arrives with issue 5: it needs canary.report")


def fail_safe(
    plan: dict[str, Any] | None, spec_path: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """Make traffic safe after any failure: canary share to 0 % when the gateway answers (idempotent).

    Runs as the ``fail_safe`` task (trigger rule ``one_failed``) and from the DAG's ``on_failure_callback``.
    ``plan`` is ``None`` when ``validate`` itself failed (then no traffic was moved by this run, but the
    spec at ``spec_path`` still names the model and the router connection).

    The ``fail_safe`` task of the factory raises ``AirflowFailException`` after this returns, so the run
    (whose leaf tasks are ``report`` and ``fail_safe``) ends failed rather than green.

    :returns: ``{"route": <route after the change or None>, "reached_gateway": bool, "reason"}``.
    """
    raise NotImplementedError("fail_safe arrives with issue 5: it needs TrafficRouterHook")
