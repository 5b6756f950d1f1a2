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

Hooks come from the spec's ``connections`` (``router``: the gateway, ``prediction_log``: the log). Every
function can be re-run: route changes are absolute and compare-and-set on the generation this run last
wrote, analysis windows are the recorded times in XCom, and a retry that finds its own change in place
returns it instead of changing traffic again.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
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
    "pause_question",
    "format_seconds",
    "promote",
    "drift_check",
    "report",
    "fail_safe",
    "hold_settings",
    "post_deploy_settings",
    "renew_lease",
    "arm_counts",
    "version_count",
    "circuit_breaker",
    "power_plan",
    "power_warnings",
    "baseline_required",
    "offline_gate",
    "root_cause",
    "worst_segments",
    "json_safe",
    "HoldSettings",
    "XComUnreadable",
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


# --------------------------------------------------------------------------------------------------------
# Settings read from the plan (durations are seconds in the plan: RolloutSpec.to_dict()).

#: Default offline gate: how much worse than stable a candidate's offline eval metric (model metadata) may
#: be before pre-flight stops the run. Offline metrics come from different held-out sets (a candidate trained
#: on other data is evaluated on its own), so this is a sanity gate that stops a clearly broken candidate
#: (AUC near 0.5, a loss that doubled) before it sees traffic; the online comparison decides the rest.
#: Fixed for now (not a spec field); documented in docs/spec.md, "Pre-flight checks". A candidate without
#: eval metrics in its metadata is not gated (the checks are listed as skipped in the log).
OFFLINE_GATE: dict[str, dict[str, Any]] = {
    "accuracy": {"direction": "increase", "margin": 0.2, "margin_type": "absolute"},
    "auc": {"direction": "increase", "margin": 0.2, "margin_type": "absolute"},
    "log_loss": {"direction": "decrease", "margin": 1.0, "margin_type": "relative"},
    "mae": {"direction": "decrease", "margin": 1.0, "margin_type": "relative"},
    "rmse": {"direction": "decrease", "margin": 1.0, "margin_type": "relative"},
}

#: Length of the pre-rollout reference window of stable traffic (baseline, power plan, drift reference).
REFERENCE_WINDOW_S = 3600

#: Most rows read for the baseline and for each side of a drift comparison when the spec does not say.
BASELINE_SAMPLE = 20000

#: Stable requests the reference window needs at least (capped by ``hold.min_samples``, see
#: :func:`baseline_required`): stable's latency p95 (the ``baseline_p95`` threshold), the metrics' base rates
#: and the power plan all come from them. Without them the run would move traffic and only fail at its first
#: look, for want of a threshold.
BASELINE_MIN_REQUESTS = 20


def baseline_required(spec: dict[str, Any]) -> int:
    """Stable requests pre-flight needs in the reference window: ``min(hold.min_samples, 20)``.

    Tied to ``hold.min_samples`` so the trigger form's ``hold_min_samples`` can lower it for a model with
    little traffic (a run that asks for few samples per look asks for few baseline requests too).
    """
    min_samples = int((spec.get("hold") or {}).get("min_samples", 500))
    return max(1, min(min_samples, BASELINE_MIN_REQUESTS))


@dataclass(frozen=True)
class HoldSettings:
    """How a step's hold ends, from the plan's spec.

    :param min_duration_s: minimum hold time per step.
    :param min_samples: minimum requests per arm in the step's window.
    :param max_wait_s: the cap of a step (hold plus extend looks), measured from the step's start.
    :param poll_interval_s: seconds between polls of the hold.
    :param needs_labels: some metric is computed from labels.
    :param label_delay_s: the longest label delay of the label metrics.
    :param min_labelled: matured labelled predictions needed per arm when labels are needed.
    :param circuit_breaker: the spec enables the circuit breaker.
    """

    min_duration_s: float
    min_samples: int
    max_wait_s: float
    poll_interval_s: float
    needs_labels: bool
    label_delay_s: float
    min_labelled: int
    circuit_breaker: bool


def _spec(plan: dict[str, Any]) -> dict[str, Any]:
    if not plan or "spec" not in plan:
        raise ValueError("the plan has no 'spec': pass the XCom of the 'validate' task (Contract 4)")
    return plan["spec"]


def _seconds(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    from canary.spec import parse_duration

    return float(parse_duration(value))


def hold_settings(plan: dict[str, Any]) -> HoldSettings:
    """The hold settings of this run (the trigger form may have overridden the spec's)."""
    spec = _spec(plan)
    hold = spec.get("hold") or {}
    label_metrics = [m for m in spec.get("metrics", []) if m.get("source") in _LABEL_SOURCES]
    min_samples = int(hold.get("min_samples", 500))
    return HoldSettings(
        min_duration_s=_seconds(hold.get("min_duration", 600)),
        min_samples=min_samples,
        max_wait_s=_seconds(hold.get("max_wait", 7200)),
        poll_interval_s=max(0.2, _seconds(hold.get("poll_interval", 30))),
        needs_labels=bool(label_metrics),
        label_delay_s=max((_seconds(m.get("label_delay", 0) or 0) for m in label_metrics), default=0.0),
        # Labels arrive for a share of requests only: a fifth of min_samples per arm is the floor before a look.
        min_labelled=max(1, min_samples // 5) if label_metrics else 0,
        circuit_breaker=bool((spec.get("circuit_breaker") or {}).get("enabled", True)),
    )


def post_deploy_settings(plan: dict[str, Any]) -> tuple[float, int]:
    """``(window seconds, min samples)`` of the post-deployment hold."""
    post = _spec(plan).get("post_deploy") or {}
    return _seconds(post.get("window", 600)), int(post.get("min_samples", 500))


_LABEL_SOURCES = ("label", "mismatch", "abs_error", "squared_error")


def _model(plan: dict[str, Any]) -> str:
    return str(_spec(plan)["model"])


def _router(plan: dict[str, Any]) -> Any:
    from canary.hooks.router import TrafficRouterHook

    conns = _spec(plan).get("connections") or {}
    return TrafficRouterHook(conns.get("router") or TrafficRouterHook.default_conn_name)


def _log_hook(plan: dict[str, Any]) -> Any:
    from canary.hooks.prediction_log import PredictionLogHook

    conns = _spec(plan).get("connections") or {}
    return PredictionLogHook(conns.get("prediction_log") or PredictionLogHook.default_conn_name)


def _fail(message: str) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def _now() -> datetime:
    from canary.hooks.timeutil import utcnow

    return utcnow()


def _context() -> Any:
    """The running task's context, or None outside a task (tests calling runtime functions directly)."""
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:  # noqa: BLE001 - no task is running
        return None


def _xcom(task_id: str, key: str = "return_value") -> Any:
    ctx = _context()
    if ctx is None:
        return None
    try:
        return ctx["ti"].xcom_pull(task_ids=task_id, key=key)
    except Exception:  # noqa: BLE001 - a task that did not run has no XCom
        return None


def _plan_of_invalid_run() -> dict[str, Any]:
    """What the report can know of a run whose ``validate`` failed: its model (from the DAG id) and run id,
    so the report is ``<model>/<model>__<run id>.html`` and not one file every failed validation overwrites."""
    from canary.dag_factory import DAG_ID_PREFIX  # here: dag_factory imports this module

    ctx = _context() or {}
    dag_id = str(getattr(ctx.get("dag"), "dag_id", "") or "")
    model = dag_id[len(DAG_ID_PREFIX):] if dag_id.startswith(DAG_ID_PREFIX) else dag_id or None
    return {"run_id": ctx.get("run_id"), "spec": {"model": model} if model else {}}


class XComUnreadable(RuntimeError):
    """This process can read no XCom of the run (a DAG callback without Task SDK comms or metadata DB)."""


def _run_xcom(run: tuple[str, str] | None, task_id: str, key: str = "return_value") -> Any:
    """One XCom of a run, for code that is not a running task (the DAG's failure callback).

    ``run`` is ``(dag_id, run_id)``; ``None`` reads through the running task's context (:func:`_xcom`). A
    DAG callback has no running task: where Airflow runs it (the DAG processor) the Task SDK's supervisor
    answers XCom reads by run id; ``dag.test()`` runs callbacks in its own process, which has no supervisor
    but holds the metadata database, so that is read directly.

    :returns: the value, or None when the task pushed nothing under ``key``.
    :raises XComUnreadable: neither way works here; the caller must not take "unreadable" for "absent".
    """
    if run is None:
        return _xcom(task_id, key)
    dag_id, run_id = run
    errors = []
    try:
        from airflow.sdk.bases.xcom import BaseXCom

        return BaseXCom.get_one(key=key, dag_id=dag_id, task_id=task_id, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - no supervisor in this process: try the database
        errors.append(f"Task SDK: {type(exc).__name__}: {exc}")
    try:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            row = session.scalars(
                select(XComModel).where(
                    XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
                    XComModel.key == key, XComModel.map_index == -1,
                )
            ).first()
            return None if row is None else XComModel.deserialize_value(row)
    except Exception as exc:  # noqa: BLE001 - reported to the caller as unreadable
        errors.append(f"metadata DB: {type(exc).__name__}: {exc}")
    raise XComUnreadable(f"XCom {task_id}/{key} of {dag_id} {run_id} is unreadable here ({'; '.join(errors)})")


def _push(key: str, value: Any) -> None:
    ctx = _context()
    if ctx is not None:
        ctx["ti"].xcom_push(key=key, value=value)


def _log(message: str, *args: Any) -> None:
    import logging

    logging.getLogger("canary.runtime").info(message, *args)


# --------------------------------------------------------------------------------------------------------
# Pre-flight


def resolve_candidate(plan: dict[str, Any], versions: list[dict[str, Any]], stable: str) -> str | None:
    """The candidate of this run: the plan's, or for a scheduled run the newest registered version newer
    than ``stable`` (by ``created_at``); ``None`` when there is none (preflight then skips the run).

    Raises ``ValueError`` when the candidate equals stable (only knowable here, at preflight).

    :param plan: the plan from :func:`validate`.
    :param versions: the model's versions as in ``GET /v1/models`` (Contract 1).
    :param stable: the stable version from the current route.
    """
    candidate = plan.get("candidate")
    if candidate:
        if candidate == stable:
            raise ValueError(
                f"candidate={candidate!r} is the stable version of {_model(plan)!r}: nothing to roll out. "
                "Give a registered version other than stable in the trigger form's 'candidate' field."
            )
        return str(candidate)
    by_name = {str(v.get("version")): v for v in versions}
    stable_created = str((by_name.get(stable) or {}).get("created_at") or "")
    newer = [
        v for v in versions
        if str(v.get("version")) != stable
        and str(v.get("created_at") or "") > stable_created
        and v.get("loadable", True)
        and v.get("stage") != "archived"
    ]
    if not newer:
        return None
    newer.sort(key=lambda v: (str(v.get("created_at") or ""), str(v.get("version"))))
    return str(newer[-1]["version"])


def offline_gate(
    stable_metrics: dict[str, Any], candidate_metrics: dict[str, Any], gate: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Compare offline eval metrics (model metadata) of candidate and stable.

    :returns: ``{"passed": bool, "checks": [{"metric", "stable", "candidate", "allowed", "passed"}]}``;
        metrics missing on either side are listed as skipped, not failed.
    """
    gate = gate or OFFLINE_GATE
    checks = []
    for name, rule in gate.items():
        s, c = stable_metrics.get(name), candidate_metrics.get(name)
        if s is None or c is None:
            checks.append({"metric": name, "stable": s, "candidate": c, "skipped": True, "passed": True})
            continue
        s, c = float(s), float(c)
        margin = float(rule.get("margin", 0.0))
        tol = margin * abs(s) if rule.get("margin_type", "absolute") == "relative" else margin
        if rule.get("direction", "increase") == "increase":
            allowed, ok = s - tol, c >= s - tol
        else:
            allowed, ok = s + tol, c <= s + tol
        checks.append({"metric": name, "stable": s, "candidate": c, "allowed": allowed,
                       "direction": rule.get("direction", "increase"), "passed": bool(ok)})
    return {"passed": all(ch["passed"] for ch in checks), "checks": checks}


def metric_value(metric: dict[str, Any], row: dict[str, Any], threshold: float | None = None) -> float:
    """The per-request value of ``metric`` (a spec metric dict) for one logged request (NaN if unobservable)."""
    nan = float("nan")
    source = metric.get("source")
    status = row.get("status")
    pred, score, label = row.get("prediction"), row.get("score"), row.get("label")
    if source == "error":
        return 1.0 if status == "error" else 0.0
    if source == "latency_ms":
        lat = row.get("latency_ms")
        if lat is None:
            return nan
        if metric.get("kind") == "latency_threshold" and threshold is not None:
            return 1.0 if float(lat) > threshold else 0.0
        return float(lat)
    if source == "null_score":
        if status == "error":
            return nan
        return 1.0 if score is None or (isinstance(score, float) and math.isnan(score)) else 0.0
    if source == "score":
        return nan if score is None else float(score)
    if source == "prediction":
        return nan if pred is None else float(pred)
    if label is None or pred is None:
        return nan
    if source == "label":
        return float(label)
    if source == "mismatch":
        return 0.0 if float(pred) == float(label) else 1.0
    if source == "abs_error":
        return abs(float(pred) - float(label))
    if source == "squared_error":
        return (float(pred) - float(label)) ** 2
    return nan


def _quantile(values: list[float], q: float) -> float | None:
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _threshold(metric: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    thr = metric.get("threshold")
    if thr == "baseline_p95":
        return baseline.get("latency_p95_ms")
    return float(thr) if isinstance(thr, int | float) else None


def _baseline(plan: dict[str, Any], stable: str, now: datetime) -> dict[str, Any]:
    """Stable's pre-rollout window: latency p95, per-metric mean and variance, request rate, label share."""
    spec = _spec(plan)
    log = _log_hook(plan)
    start = now - timedelta(seconds=REFERENCE_WINDOW_S)
    rows = log.window_rows(
        _model(plan), start=start, end=now, versions={"stable": stable}, with_labels=True,
        limit=max(BASELINE_SAMPLE, int((spec.get("drift") or {}).get("sample_size", 0) or 0)),
    )
    from canary.hooks.timeutil import iso, parse_ts

    total = log.version_count(_model(plan), version=stable, start=start, end=now)
    first = min((parse_ts(r["ts"]) for r in rows), default=None)
    window_start = max(start, first) if first else start
    span = max(1.0, (now - window_start).total_seconds())
    p95 = _quantile([float(r["latency_ms"]) for r in rows if r.get("latency_ms") is not None], 0.95)
    baseline: dict[str, Any] = {
        "latency_p95_ms": p95,
        "reference_window": [iso(window_start), iso(now)],
        "requests": total,
        "sampled": len(rows),
        "rate_per_s": total / span if total else 0.0,
        "labelled_share": (sum(1 for r in rows if r.get("label") is not None) / len(rows)) if rows else 0.0,
        "base_rates": {},
        "variances": {},
    }
    for m in spec.get("metrics", []):
        thr = _threshold(m, baseline)
        xs = [metric_value(m, r, thr) for r in rows]
        xs = [x for x in xs if not math.isnan(x)]
        if xs:
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)
        else:
            mean, var = None, None
        baseline["base_rates"][m["name"]] = mean
        baseline["variances"][m["name"]] = var
    return baseline


def power_plan(spec: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Expected time per step, requests exposed to the canary, and the smallest harm each metric can detect.

    Pure: from the spec (as a dict) and the baseline. The detectable harm is the difference the one-sided
    rollback test at the metric's alpha share detects with 80 % power at the end of the plan (a fixed-sample
    approximation; group-sequential boundaries cost a few percent more).
    """
    from statistics import NormalDist

    hold = spec.get("hold") or {}
    min_duration = _seconds(hold.get("min_duration", 600))
    min_samples = int(hold.get("min_samples", 500))
    max_wait = _seconds(hold.get("max_wait", 7200))
    metrics = spec.get("metrics", [])
    label_metrics = [m for m in metrics if m.get("source") in _LABEL_SOURCES]
    label_delay = max((_seconds(m.get("label_delay", 0) or 0) for m in label_metrics), default=0.0)
    labelled_share = float(baseline.get("labelled_share") or 0.0)
    rate = float(baseline.get("rate_per_s") or 0.0)
    promotion = _promotion_samples(spec, baseline)
    # Canary requests the promotion test needs in all (label metrics need their labelled share): the last
    # step extends until the rollout has them (earlier steps advance once no harm is shown).
    total_requests = max((p["total_requests"] for p in promotion.values() if p.get("total_requests")), default=0)
    steps_out, total_s, n_canary, n_stable = [], 0.0, 0.0, 0.0
    n_steps = len(spec.get("steps", []))
    for i, pct in enumerate(spec.get("steps", []), start=1):
        share = float(pct) / 100.0
        c_rate, s_rate = rate * share, rate * (1 - share)
        needs = [("min_duration", min_duration)]
        if c_rate > 0 and s_rate > 0:
            needs.append(("min_samples", min_samples / min(c_rate, s_rate)))
            if label_metrics:
                needs.append(("labels", label_delay + (max(1, min_samples // 5) / max(1e-9, min(c_rate, s_rate)
                                                                                       * max(labelled_share, 1e-9)))))
            if i == n_steps and total_requests > n_canary:
                needs.append(("promotion power", (total_requests - n_canary) / c_rate))
        else:
            needs.append(("no traffic", max_wait))
        limited_by, t = max(needs, key=lambda x: x[1])
        if t > max_wait:
            limited_by, t = "max_wait", max_wait
        steps_out.append({
            "step_index": i, "percent": pct, "expected_s": round(t, 1), "limited_by": limited_by,
            "expected_canary_requests": int(c_rate * t), "expected_stable_requests": int(s_rate * t),
        })
        total_s += t
        n_canary += c_rate * t
        n_stable += s_rate * t
    alpha = float((spec.get("alpha") or {}).get("rollback", 0.05)) / max(1, len(metrics))
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(0.8)
    detectable = {}
    for m in metrics:
        var = (baseline.get("variances") or {}).get(m["name"])
        base = (baseline.get("base_rates") or {}).get(m["name"])
        nc, ns = n_canary, n_stable
        if m.get("source") in _LABEL_SOURCES:
            nc, ns = nc * labelled_share, ns * labelled_share
        if m.get("kind") in ("binary", "latency_threshold") and base is not None:
            # A rate of 0 in the reference window is not a rate of exactly 0: floor it at one event.
            floor = 1.0 / max(1, int(baseline.get("sampled") or 0))
            b_ = min(max(float(base), floor), 1 - floor)
            var = b_ * (1 - b_)
        if var is None or nc < 1 or ns < 1:
            detectable[m["name"]] = {"base": base, "detectable_harm": None,
                                     "note": "no stable data in the reference window"}
            continue
        mde = z * math.sqrt(var * (1 / nc + 1 / ns))
        detectable[m["name"]] = {"base": base, "detectable_harm": mde, "margin": m.get("margin"),
                                 "margin_type": m.get("margin_type")}
    deadline = _seconds(spec.get("deadline", 86400))
    post_s = _seconds((spec.get("post_deploy") or {}).get("window", 0))
    # Planned (maximum) information: the canary samples the rollout holds if its last step runs to its cap,
    # or the promotion test's requirement when larger. Past full information a group-sequential boundary has
    # no alpha left (it is infinite), so a smaller plan would leave the harm test blind for the rest of an
    # extended step; this way it reaches 1 at the cap at the latest.
    last_pct = float((spec.get("steps") or [0])[-1]) / 100.0
    at_cap = sum(st["expected_canary_requests"] for st in steps_out[:-1]) + rate * last_pct * max_wait
    needed = max((p["total"] for p in promotion.values() if p.get("total")), default=0)
    planned = max(int(at_cap), int(needed), 2 * min_samples)
    return {
        "rate_per_s": rate,
        "steps": steps_out,
        "expected_total_s": round(total_s + post_s, 1),
        "deadline_s": deadline,
        "fits_deadline": total_s + post_s <= deadline,
        "expected_exposed_requests": int(n_canary),
        "detectable_harm": detectable,
        "promotion_samples": promotion,
        "planned_canary_samples": int(planned),
    }


def _promotion_samples(spec: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per metric: canary samples the non-inferiority test needs for 80 % power when the candidate equals
    stable (``canary.analysis.planning``), and the requests that takes per step (label share included)."""
    from canary.analysis.planning import plan_canary_samples

    steps = [float(p) for p in spec.get("steps", [])]
    alpha = float((spec.get("alpha") or {}).get("promotion", 0.05))
    labelled_share = float(baseline.get("labelled_share") or 0.0)
    floor = 1.0 / max(1, int(baseline.get("sampled") or 0))
    out: dict[str, dict[str, Any]] = {}
    for m in spec.get("metrics", []):
        base = (baseline.get("base_rates") or {}).get(m["name"])
        var = (baseline.get("variances") or {}).get(m["name"])
        if base is None or var is None:
            out[m["name"]] = {"note": "no stable data in the reference window"}
            continue
        if m.get("kind") in ("binary", "latency_threshold"):
            b_ = min(max(float(base), floor), 1 - floor)
            var = b_ * (1 - b_)
        margin = float(m.get("margin") or 0.0)
        margin_abs = margin * abs(float(base)) if m.get("margin_type") == "relative" else margin
        if margin_abs <= 0 or var <= 0:
            out[m["name"]] = {"note": "margin 0: non-inferiority needs the canary to be strictly better"}
            continue
        sp = plan_canary_samples(var, margin_abs, steps, alpha=alpha)
        share = labelled_share if m.get("source") in _LABEL_SOURCES else 1.0
        out[m["name"]] = {"per_step": sp.per_step, "total": sp.total, "margin_abs": margin_abs,
                          "total_requests": int(math.ceil(sp.total / max(share, 1e-9)))}
    return out


def power_warnings(spec: dict[str, Any], baseline: dict[str, Any], pp: dict[str, Any]) -> list[dict[str, Any]]:
    """Metrics whose promotion test the schedule cannot power, as ``{"metric", "problem", "message", ...}``.

    Pure. ``underpowered``: the canary samples the schedule can expose at most (stable's measured request
    rate x each step's canary share x ``hold.max_wait``, summed; label metrics x the labelled share) fall short
    of the samples the non-inferiority test needs for 80 % power (``pp["promotion_samples"]``), so even a
    candidate identical to stable is unlikely to be promoted. ``zero_base_rate``: a relative margin on a
    metric whose base rate on stable is 0, which makes the margin 0. Pre-flight logs these as warnings and
    runs on (it does not refuse).
    """
    hold = spec.get("hold") or {}
    max_wait = _seconds(hold.get("max_wait", 7200))
    rate = float(baseline.get("rate_per_s") or 0.0)
    labelled_share = float(baseline.get("labelled_share") or 0.0)
    steps = [float(p) for p in spec.get("steps", [])]
    exposed_all = sum(rate * p / 100.0 * max_wait for p in steps)
    promotion = pp.get("promotion_samples") or {}
    out: list[dict[str, Any]] = []
    for m in spec.get("metrics", []):
        name = m["name"]
        base = (baseline.get("base_rates") or {}).get(name)
        if m.get("margin_type") == "relative" and base is not None and float(base) == 0.0:
            out.append({
                "metric": name, "problem": "zero_base_rate", "base_rate": 0.0, "margin": m.get("margin"),
                "message": (
                    f"metric {name}: margin {m.get('margin')} is relative and stable's base rate in the reference "
                    f"window is 0, so the margin is 0 and nothing can be shown non-inferior: an identical "
                    f"candidate will not be promoted. Fix: give metric {name} an absolute margin "
                    f"(margin_type: absolute, margin: the largest harm you accept in the metric's units)."
                ),
            })
            continue
        need = (promotion.get(name) or {}).get("total")
        if not need:
            continue
        label = m.get("source") in _LABEL_SOURCES
        exposed = int(exposed_all * (labelled_share if label else 1.0))
        if exposed >= int(need):
            continue
        what = "labelled canary samples" if label else "canary samples"
        out.append({
            "metric": name, "problem": "underpowered", "samples_needed": int(need), "samples_exposed": exposed,
            "message": (
                f"metric {name}: the promotion test needs ~{int(need)} {what} for 80% power, but the schedule "
                f"exposes at most ~{exposed} ({rate:.2f} req/s x steps {spec.get('steps')}% x hold.max_wait "
                f"{max_wait:.0f}s" + (f" x labelled share {labelled_share:.2f}" if label else "") + "), so even a "
                "candidate identical to stable will likely end inconclusive rather than promoted. Fix: a wider "
                f"margin for {name}, a longer hold.max_wait, or fewer, larger steps."
            ),
        })
    return out


def power_plan_text(model: str, stable: str, candidate: str, plan: dict[str, Any]) -> str:
    """The power plan as a few readable lines for the task log."""
    lines = [
        f"power plan for {model}: {stable} -> {candidate}, stable traffic {plan['rate_per_s']:.2f} req/s "
        f"over the last hour",
    ]
    for st in plan["steps"]:
        lines.append(
            f"  step {st['step_index']} at {st['percent']}%: ~{st['expected_s']:.0f}s ({st['limited_by']}), "
            f"~{st['expected_canary_requests']} canary / ~{st['expected_stable_requests']} stable requests"
        )
    lines.append(
        f"  expected total {plan['expected_total_s']:.0f}s (deadline {plan['deadline_s']:.0f}s), "
        f"~{plan['expected_exposed_requests']} requests exposed to the candidate; planned information "
        f"{plan['planned_canary_samples']} canary samples (the last step at its cap)"
    )
    for name, p in (plan.get("promotion_samples") or {}).items():
        if p.get("total"):
            lines.append(f"  {name}: non-inferiority within {p['margin_abs']:.4g} needs ~{p['per_step']} canary "
                         f"samples per step (~{p['total']} in all) for 80% power")
    for name, d in plan["detectable_harm"].items():
        if d.get("detectable_harm") is None:
            lines.append(f"  {name}: {d.get('note')}")
        else:
            lines.append(f"  {name}: base {d['base']:.4g}, smallest harm detectable with 80% power "
                         f"{d['detectable_harm']:.4g} (margin {d.get('margin')} {d.get('margin_type')})")
    return "\n".join(lines)


# The columns the data-quality rows carry besides the candidate's logged features (see _feature_frames).
DQ_LOG_COLUMNS = ("arm", "version", "unit_id", "prediction", "score", "status", "latency_ms")


def _preflight_data_quality(plan: dict[str, Any], candidate: str, stable: str, cand_meta: dict[str, Any],
                            stable_meta: dict[str, Any]) -> None:
    """Load the spec's data-quality suite and check the columns it names before any traffic moves.

    Without this a typo in the suite surfaces only at the first look: an unknown expectation type is dropped by
    GX (the check silently shrinks), and a column the rows lack fails every look and rolls back a good
    candidate. The canary's rows have the candidate's features (the gateway logs the features of the version
    that served) plus :data:`DQ_LOG_COLUMNS`.
    """
    name = (_spec(plan).get("data_quality") or {}).get("suite")
    if not name:
        return
    from canary.analysis import quality

    try:
        suite = quality.load_suite(name)
    except (ValueError, OSError) as exc:
        raise _fail(f"pre-flight refused: data_quality.suite={name!r} cannot run: {exc}\nNothing was changed.") from exc
    except ImportError as exc:
        raise _fail(f"pre-flight refused: data_quality.suite={name!r} needs Great Expectations 1.x, which does not "
                    f"import here ({exc}). Install it in the worker image or set data_quality.suite: null. "
                    "Nothing was changed.") from exc
    model = _model(plan)
    features = [str(f) for f in cand_meta.get("features") or []]
    if not features:
        _log("data quality: %s/%s lists no features; the columns of suite %s are checked at the first look only",
             model, candidate, name)
        return
    unknown = quality.unknown_columns(suite, features + [c for c in DQ_LOG_COLUMNS if c not in features])
    if unknown:
        stable_only = {str(f) for f in stable_meta.get("features") or []} - set(features)
        lines = []
        for u in unknown:
            why = (f"a feature of stable {stable} only, and the canary's rows carry the candidate's features"
                   if u["column"] in stable_only else "no such column in the canary's rows")
            hint = f"; did you mean {u['suggestion']!r}?" if u["suggestion"] else ""
            lines.append(f"expectations[{u['index']}] {u['expectation']}({u['column']}): {why}{hint}")
        raise _fail(
            f"pre-flight refused: data-quality suite {name!r} ({quality.suite_path(name)}) names column(s) the "
            "canary's rows will not have:\n  " + "\n  ".join(lines) + f"\nThe rows have the features of {model} "
            f"{candidate} ({', '.join(features)}) and the log columns {', '.join(DQ_LOG_COLUMNS)}. Nothing was "
            "changed. Fix: correct the column name in the suite file (or drop that expectation) and trigger again; "
            "left as is, it would fail every look and roll back a good candidate."
        )
    _log("data quality: suite %s, %d expectations, every column it names is in the canary's rows",
         name, len(suite["expectations"]))


def preflight(plan: dict[str, Any]) -> dict[str, Any]:
    """Check the candidate before any traffic moves and record the baseline.

    Checks: the candidate exists and is loadable, candidate != stable, the offline eval gate, the route is
    as expected (no canary share already), stable served enough requests in the reference window for a
    baseline (:func:`baseline_required`), and computes the power plan.

    :returns: ``{"stable", "candidate", "generation", "rollout_started_at", "baseline": {"latency_p95_ms",
        "base_rates": {metric: rate}, "reference_window": [start, end]}, "power_plan", "power_warnings"}``;
        ``power_warnings`` (also in ``power_plan``) lists the metrics the schedule cannot power
        (:func:`power_warnings`), each logged as a WARNING; they do not stop the run.
    :raises AirflowSkipException: a scheduled run finds no version newer than stable.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    from canary.hooks.errors import GatewayNotFoundError
    from canary.hooks.timeutil import iso

    spec = _spec(plan)
    model = _model(plan)
    router = _router(plan)
    try:
        route = router.get_route(model)
    except GatewayNotFoundError as exc:
        raise _fail(f"pre-flight: the gateway does not serve model {model!r} ({exc}); check spec.model and "
                    "the gateway's model directory") from exc
    stable = route.stable
    if not stable:
        raise _fail(f"pre-flight: the route of {model!r} has no stable version; set one before a rollout")
    if route.canary and (route.canary_percent > 0 or route.mode == "shadow"):
        raise _fail(
            f"pre-flight refused: another canary is active on {model!r}: {route.canary} at "
            f"{route.canary_percent:g}% ({route.mode}, generation {route.generation}, lease until "
            f"{route.lease_expires_at}). Nothing was changed. Wait for that rollout to finish or roll it back "
            "before starting another."
        )
    versions = router.list_versions(model)
    try:
        candidate = resolve_candidate(plan, versions, stable)
    except ValueError as exc:
        raise _fail(f"pre-flight: {exc}") from exc
    if candidate is None:
        raise AirflowSkipException(
            f"no registered version of {model!r} is newer than stable {stable}: nothing to promote tonight"
        )
    registered = sorted(str(v.get("version")) for v in versions)
    try:
        cand_meta = router.get_version(model, candidate)
    except GatewayNotFoundError as exc:
        raise _fail(
            f"pre-flight: candidate={candidate!r} is not a registered version of {model!r} (registered: "
            f"{', '.join(registered) or 'none'}). Register it in the model directory or pick one of these."
        ) from exc
    if not cand_meta.get("loadable", False):
        raise _fail(f"pre-flight: candidate {model}/{candidate} does not load at the gateway: "
                    f"{cand_meta.get('error') or 'unknown error'}. Fix the artifact or its metadata.")
    stable_meta = router.get_version(model, stable)
    _preflight_data_quality(plan, candidate, stable, cand_meta, stable_meta)
    gate = offline_gate(stable_meta.get("eval_metrics") or {}, cand_meta.get("eval_metrics") or {},
                        spec.get("offline_gate") or None)
    gate_text = "; ".join(
        f"{c['metric']}: stable {c['stable']} candidate {c['candidate']}"
        + ("" if c.get("skipped") else f" (allowed {c['allowed']:.4g}, {'ok' if c['passed'] else 'WORSE'})")
        for c in gate["checks"]
    )
    _log("offline eval gate: %s", gate_text)
    if not gate["passed"]:
        raise _fail(f"pre-flight: candidate {candidate} is worse offline than stable {stable} beyond the margin: "
                    f"{gate_text}. Nothing was changed.")
    now = _now()
    baseline = _baseline(plan, stable, now)
    required = baseline_required(spec)
    if int(baseline["requests"] or 0) < required:
        start, end = iso(now - timedelta(seconds=REFERENCE_WINDOW_S)), iso(now)
        raise _fail(
            f"pre-flight refused: stable {stable} of {model!r} served {baseline['requests']} request(s) in the "
            f"reference window {start} .. {end} (the last {REFERENCE_WINDOW_S // 60} min); the rollout needs at "
            f"least {required} to measure stable's baseline (the latency p95 a baseline_p95 threshold uses, each "
            "metric's base rate, the power plan). Nothing was changed. Fix: send traffic to the model "
            f"(POST /v1/models/{model}/predict) and trigger again once stable has served {required} requests, or "
            f"lower the requirement: it is min(hold.min_samples, {BASELINE_MIN_REQUESTS}), so a smaller "
            "hold_min_samples in the trigger form lowers it."
        )
    pp = power_plan(spec, baseline)
    _log("%s", power_plan_text(model, stable, candidate, pp))
    # Warn, do not refuse: the run still guards against harm; it just cannot promote an equal candidate.
    warnings = power_warnings(spec, baseline, pp)
    pp["power_warnings"] = warnings
    for w in warnings:
        logging.getLogger("canary.runtime").warning("pre-flight power check: %s", w["message"])
    if not pp["fits_deadline"]:
        raise _fail(
            f"pre-flight: the rollout of {model} cannot finish within its deadline: expected "
            f"{pp['expected_total_s']:.0f}s > deadline {pp['deadline_s']:.0f}s at {pp['rate_per_s']:.2f} req/s. "
            "Lower hold.min_samples, use fewer or larger steps, or raise the deadline. Nothing was changed."
        )
    return {
        "model": model,
        "stable": stable,
        "candidate": candidate,
        "generation": route.generation,
        "route": route.to_dict(),
        "rollout_started_at": iso(now),
        "baseline": baseline,
        "power_plan": pp,
        "power_warnings": warnings,
        "offline_gate": gate,
        "candidate_features": list(cand_meta.get("features") or []),
    }


# --------------------------------------------------------------------------------------------------------
# Traffic


def _target(plan: dict[str, Any], pre: dict[str, Any], percent: float) -> dict[str, Any]:
    return {"stable": pre["stable"], "canary": pre["candidate"], "canary_percent": float(percent), "mode": "split"}


def set_traffic(
    plan: dict[str, Any], pre: dict[str, Any], step_index: int, last_route: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Set the canary share of step ``step_index`` (1-based): absolute, idempotent, with a lease,
    compare-and-set on the generation seen in ``last_route`` (or ``pre`` for step 1).

    :returns: ``{"route": <route after the change>, "step_started_at": <the gateway's updated_at>,
        "percent", "step_index"}`` (a retry that finds the route already set returns the same time).
    """
    spec = _spec(plan)
    steps = spec["steps"]
    if not 1 <= int(step_index) <= len(steps):
        raise ValueError(f"step_index={step_index} is outside 1..{len(steps)}")
    percent = float(steps[int(step_index) - 1])
    model = _model(plan)
    if last_route and "route" in last_route:
        last_route = last_route["route"]
    expected = int((last_route or {}).get("generation", pre["generation"]) if last_route else pre["generation"])
    target = _target(plan, pre, percent)
    _push("intent", {"expected_generation": expected, **target})
    router = _router(plan)
    now = router.get_route(model)

    def result(route: Any, note: str) -> dict[str, Any]:
        _log("step %s: %s; route %s", step_index, note, route.to_dict())
        return {"route": route.to_dict(), "step_started_at": route.updated_at, "percent": percent,
                "step_index": int(step_index)}

    if now.generation == expected:
        route = router.set_route(model, **target, lease_seconds=int(_seconds(spec.get("lease", 900))),
                                 if_generation=expected)
        return result(route, f"canary {pre['candidate']} set to {percent:g}%")
    if now.generation == expected + 1 and now.same_target(**target):
        # A retry after a change that succeeded: the route is what this task wrote; do not step again.
        return result(now, f"already at {percent:g}% (this task's earlier attempt); not stepping twice")
    raise _fail(
        f"step {step_index}: the route of {model} is not what this run last wrote, someone else changed it: "
        f"expected generation {expected} ({pre['stable']} with {pre['candidate']} at the previous share), found "
        f"generation {now.generation}: stable={now.stable} canary={now.canary} at {now.canary_percent:g}% "
        f"({now.mode}), updated {now.updated_at}. Stopping without touching it; find out who changed it (a lease "
        "expiry returns traffic to stable and bumps the generation too)."
    )


def renew_lease(plan: dict[str, Any], pre: dict[str, Any], generation: int) -> dict[str, Any]:
    """Extend the lease of the route this run wrote (``generation``); fails if the route moved."""
    route = _router(plan).renew_lease(
        _model(plan), if_generation=int(generation), lease_seconds=int(_seconds(_spec(plan).get("lease", 900)))
    )
    return route.to_dict()


def arm_counts(
    plan: dict[str, Any], pre: dict[str, Any], *, start: datetime, end: datetime, label_cutoff: datetime | None
) -> dict[str, dict[str, int]]:
    """Requests, errors and matured labelled requests per arm in ``[start, end)``."""
    return _log_hook(plan).arm_counts(
        _model(plan), stable=pre["stable"], canary=pre["candidate"], start=start, end=end, label_cutoff=label_cutoff
    )


def version_count(plan: dict[str, Any], pre: dict[str, Any], *, start: datetime, end: datetime) -> int:
    """Requests answered by the candidate (the new stable after promotion) in ``[start, end)``."""
    return _log_hook(plan).version_count(_model(plan), version=pre["candidate"], start=start, end=end)


#: Canary errors before the hold's breaker may trip: its mixture likelihood ratio uses a normal approximation,
#: which a couple of events do not support (2 errors in 32 against 0 in 307 gave log LR 7.7 > log 1000).
BREAKER_MIN_ERRORS = 5


def circuit_breaker(plan: dict[str, Any], counts: dict[str, dict[str, int]]) -> dict[str, Any] | None:
    """The always-valid breaker (mSPRT) on the error counts of the step so far, for critical ``error`` metrics.

    The mixing spread is the judge's: the largest of stable's error rate, the metric's margin and four
    standard errors, so a flood of errors trips it within a hold while noise does not.

    :returns: the breaker's finding when it trips, else None.
    """
    spec = _spec(plan)
    breaker = spec.get("circuit_breaker") or {}
    if not breaker.get("enabled", True):
        return None
    metrics = [m for m in spec.get("metrics", []) if m.get("source") == "error" and m.get("critical")]
    if not metrics:
        return None
    from canary.analysis.gates import circuit_breaker as msprt

    s, c = counts["stable"], counts["canary"]
    ns, nc = int(s["requests"]), int(c["requests"])
    if ns <= 0 or nc <= 0 or c["errors"] < BREAKER_MIN_ERRORS:
        return None
    ps, pc = s["errors"] / ns, c["errors"] / nc
    pool = (s["errors"] + c["errors"]) / (ns + nc)
    pool = min(max(pool, 0.5 / (ns + nc)), 1 - 0.5 / (ns + nc))
    var = pool * (1 - pool) * (1 / ns + 1 / nc)
    m = metrics[0]
    margin = float(m.get("margin") or 0.0) * (ps if m.get("margin_type") == "relative" else 1.0)
    tau = max(ps, margin, 4.0 * math.sqrt(var))  # the judge's choice for its breaker (canary.analysis.judge)
    found = msprt(pc - ps, var, tau, float(breaker.get("alpha", 0.001)))
    if not found.get("tripped"):
        return None
    return {**found, "metric": m["name"], "stable": [s["errors"], ns], "canary": [c["errors"], nc]}


# --------------------------------------------------------------------------------------------------------
# Analysis


def _observations(plan: dict[str, Any], pre: dict[str, Any], steps_so_far: list[dict[str, Any]], policy: Any,
                  thresholds: dict[str, float]) -> Any:
    """Sufficient statistics of both arms over every step's recorded window, aggregated in the database
    (``canary.analysis.sql.look_stats``): only the recorded ``step_started_at`` and ``look_at`` count."""
    from canary.analysis.sql import look_stats
    from canary.hooks.timeutil import to_naive_utc

    windows = [(k, float(st.get("percent") or 0.0), to_naive_utc(st["step_started_at"]), to_naive_utc(st["look_at"]))
               for k, st in enumerate(steps_so_far)]
    look_at = to_naive_utc(steps_so_far[-1]["look_at"])
    return look_stats(_log_hook(plan).get_sqlalchemy_engine(), _model(plan), windows, policy, look_at,
                      thresholds=thresholds)


def _feature_frames(plan: dict[str, Any], pre: dict[str, Any], start: datetime, end: datetime,
                    versions: dict[str, str], limit: int) -> Any:
    """Logged inputs (one column per feature), with arm, version, prediction, score, status."""
    import json

    import pandas as pd

    rows = _log_hook(plan).window_rows(_model(plan), start=start, end=end, versions=versions,
                                       with_features=True, limit=limit)
    recs = []
    for r in rows:
        try:
            feats = json.loads(r.get("features") or "{}")
        except ValueError:
            feats = {}
        recs.append({**(feats if isinstance(feats, dict) else {}), "arm": r["arm"], "version": r["version"],
                     "unit_id": r.get("unit_id"),
                     "prediction": r.get("prediction"), "score": r.get("score"), "status": r.get("status"),
                     "latency_ms": r.get("latency_ms")})
    return pd.DataFrame.from_records(recs)


def _data_quality(plan: dict[str, Any], pre: dict[str, Any], steps_so_far: list[dict[str, Any]]) -> Any:
    """Great Expectations suite of the spec on the canary's rows of the current step (None when no suite)."""
    from canary.hooks.timeutil import parse_ts

    dq = _spec(plan).get("data_quality") or {}
    if not dq.get("suite"):
        return None
    try:
        from canary.analysis import quality
    except ImportError:
        return None
    st = steps_so_far[-1]
    frame = _feature_frames(plan, pre, parse_ts(st["step_started_at"]), parse_ts(st["look_at"]),
                            {"canary": pre["candidate"]}, int(dq.get("sample_size", 5000)))
    return quality.validate(frame, dq["suite"])


def _arm_drift(plan: dict[str, Any], pre: dict[str, Any], steps_so_far: list[dict[str, Any]]) -> Any:
    """Input drift between the arms over the current step (a biased routing shows here)."""
    from canary.hooks.timeutil import parse_ts

    try:
        from canary.analysis import drift
    except ImportError:
        return None
    spec_drift = _spec(plan).get("drift") or {}
    st = steps_so_far[-1]
    frame = _feature_frames(plan, pre, parse_ts(st["step_started_at"]), parse_ts(st["look_at"]),
                            {"stable": pre["stable"], "canary": pre["candidate"]},
                            int(spec_drift.get("sample_size", 20000)))
    if frame.empty:
        return None
    # Routing assigns units, not requests: a unit's attributes repeat in every one of its requests, so rows
    # are not independent draws. Compare the arms on one row per unit (the newest), the unit of
    # randomisation; requests without a unit id are each their own unit.
    keyed = frame["unit_id"].notna()
    frame = _pd().concat([frame[keyed].drop_duplicates(subset=["arm", "unit_id"], keep="first"), frame[~keyed]])
    features = _drift_features(plan, pre, frame)
    return drift.compare_arms(frame[frame["arm"] == "stable"], frame[frame["arm"] == "canary"], features,
                              bins=int(spec_drift.get("bins", 10)),
                              psi_floor=float(spec_drift.get("psi_floor", 0.1)))


def _pd() -> Any:
    import pandas as pd

    return pd


def _drift_features(plan: dict[str, Any], pre: dict[str, Any], frame: Any) -> list[str]:
    wanted = (_spec(plan).get("drift") or {}).get("features", "all")
    known = list(pre.get("candidate_features") or [])
    if wanted == "all" or not wanted:
        return [f for f in known if f in frame.columns] or [
            c for c in frame.columns
            if c not in ("arm", "version", "unit_id", "prediction", "score", "status", "latency_ms")]
    return [f for f in wanted if f in frame.columns]


def analyze(
    plan: dict[str, Any],
    pre: dict[str, Any],
    steps_so_far: list[dict[str, Any]],
    history: dict[str, Any] | None,
    final_look: bool = False,
) -> dict[str, Any]:
    """One look: aggregate the recorded windows of every step so far, run the judge, write the record.

    :param steps_so_far: per step up to the current one: ``{"step_index", "percent", "step_started_at",
        "look_at"}`` from the ``set_traffic`` and ``hold`` XComs (windows are recorded times, never now()).
    :param history: the look history of earlier looks (JSON, see ``canary.analysis.LookHistory``).
    :param final_look: this look is at the step's cap (no later look): on the last step the judge spends all
        remaining alpha (``canary.analysis.judge``'s ``final_look``).
    :returns: ``{"verdict": Verdict.to_dict(), "history": LookHistory.to_dict(), "record": <text>}``.
    """
    from canary.analysis import judge
    from canary.spec import spec_from_dict

    spec = _spec(plan)
    rollout = spec_from_dict(spec)
    planned = (pre.get("power_plan") or {}).get("planned_canary_samples")
    policy = rollout.policy(planned_canary_samples=int(planned) if planned else None)
    baseline = pre.get("baseline") or {}
    thresholds = {m["name"]: baseline["latency_p95_ms"] for m in spec.get("metrics", [])
                  if m.get("threshold") == "baseline_p95" and baseline.get("latency_p95_ms") is not None}
    observations = _observations(plan, pre, steps_so_far, policy, thresholds)
    dq = _data_quality(plan, pre, steps_so_far)
    drift = _arm_drift(plan, pre, steps_so_far)
    is_last = int(steps_so_far[-1]["step_index"]) == len(spec["steps"])
    verdict = judge(observations, policy, history, is_last_step=is_last, thresholds=thresholds,
                    data_quality=dq, drift=drift, final_look=final_look)
    out = verdict.to_dict()
    breaker = steps_so_far[-1].get("breaker")
    if breaker:
        # The hold's always-valid breaker (mSPRT on the step's error counts, canary.analysis.gates) tripped:
        # valid at any time, so it stands even when the look has too few clusters to test the metric. When
        # the judge rolls back too, both reasons are given: the breaker is what ended the hold early.
        tripped = (
            f"circuit breaker during the hold of step {steps_so_far[-1]['step_index']} on {breaker.get('metric')}: "
            f"canary {breaker['canary'][0]}/{breaker['canary'][1]} errors vs stable "
            f"{breaker['stable'][0]}/{breaker['stable'][1]} (log LR {breaker['log_lr']:.3g} >= "
            f"{breaker['threshold']:.3g})"
        )
        if out["decision"] == "rollback":
            out["reason"] = f"{verdict.reason}; and the {tripped}, which ended the hold early"
        else:
            out["decision"] = "rollback"
            out["reason"] = f"{tripped}; the judge alone said: {verdict.reason}"
        out["circuit_breaker"] = breaker
    header = (f"{_model(plan)} {pre['stable']} -> {pre['candidate']}, step {steps_so_far[-1]['step_index']}/"
              f"{len(spec['steps'])} at {steps_so_far[-1].get('percent')}%, window "
              f"{steps_so_far[-1]['step_started_at']} .. {steps_so_far[-1]['look_at']}")
    record = header + "\n" + verdict.to_text()
    if out.get("circuit_breaker"):
        record += (f"\nOVERRIDDEN -> ROLLBACK: {out['reason']}" if verdict.decision != "rollback"
                   else f"\nROLLBACK, with the hold's circuit breaker: {out['reason']}")
    return json_safe({"verdict": out, "history": verdict.history.to_dict(), "record": record})


def json_safe(obj: Any) -> Any:
    """A copy that strict JSON (XCom, trigger kwargs) accepts: NaN and infinities become None, numpy scalars
    plain numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def decide(plan: dict[str, Any], step_index: int, analysis: dict[str, Any] | None) -> str:
    """The branch of step ``step_index``: which task runs next, from the step's analysis XCom.

    ``advance`` goes to the next step's ``set_traffic`` (``promote`` after the last step only when the
    verdict is ``promote``); ``rollback`` goes to the rollback path; an ``extend`` that reached its cap
    (the analyze task only returns ``extend`` at the cap) and any verdict that does not fit the step
    (``advance`` at the last step, or an unknown decision) follow the spec's ``on_inconclusive``.

    :returns: the task id to follow: ``step_<i+1>.set_traffic``, ``promote``, ``step_<i>.to_rollback`` or
        ``step_<i>.to_pause`` (the per-step gates in front of the shared ``rollback`` and ``pause`` tasks).
    """
    steps = plan["spec"]["steps"]
    n = len(steps)
    if not 1 <= step_index <= n:
        raise ValueError(f"step_index={step_index} is outside 1..{n}: the plan has {n} steps")
    verdict = (analysis or {}).get("verdict") or {}
    decision = verdict.get("decision")
    last = step_index == n
    group = f"step_{step_index}"
    if decision == "rollback":
        return f"{group}.to_rollback"
    if decision == "promote" and last:
        return "promote"
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


# --------------------------------------------------------------------------------------------------------
# Endings


def _unwrap_verdict(verdict: dict[str, Any] | None) -> dict[str, Any]:
    if verdict and "verdict" in verdict and isinstance(verdict["verdict"], dict):
        return verdict["verdict"]
    return verdict or {}


def root_cause(verdict: dict[str, Any] | None) -> dict[str, Any]:
    """What made the verdict: failing metrics with numbers, data-quality failures, top drifting features,
    worst segments (the steps where the canary did worst), from a ``Verdict.to_dict()``.

    ``top_drifting_features`` holds only features whose drift test flagged them (at most 5, largest first as a
    multiple of their threshold); when none did, ``closest_to_drifting`` holds the 5 nearest instead."""
    v = _unwrap_verdict(verdict)
    failing = []
    for m in v.get("metrics") or []:
        tripped = bool((m.get("breaker") or {}).get("tripped"))
        if m.get("harm") or tripped:
            failing.append({
                "metric": m.get("name"), "stable": m.get("stable"), "canary": m.get("canary"),
                "difference": m.get("diff"), "interval": m.get("interval"), "z_harm": m.get("z_harm"),
                "boundary": m.get("b_rollback"), "samples": m.get("samples"),
                "circuit_breaker": tripped,
            })
    dq = v.get("data_quality") or {}
    drift = v.get("drift") or {}
    columns = drift.get("columns") or {}
    compared = [
        {"feature": name, **{k: r.get(k) for k in ("kind", "psi", "js", "ks", "threshold", "drifted")}}
        for name, r in columns.items() if isinstance(r, dict) and r.get("threshold")
    ]
    # Largest first, as a multiple of each column's own threshold (PSI and JS are on different scales).
    compared.sort(key=lambda d: -float(d.get("psi") or d.get("js") or 0.0) / float(d["threshold"]))
    drifting = [d for d in compared if d.get("drifted")][:5]
    # None drifted: the nearest ones, under their own name (a "drifting" list of undrifted features misleads).
    closest = [] if drifting else compared[:5]
    return {
        "decision": v.get("decision"),
        "reason": v.get("reason"),
        "failing_metrics": failing,
        "data_quality_failures": list(dq.get("failures") or []) if dq and not dq.get("success", True) else [],
        "top_drifting_features": drifting,
        "closest_to_drifting": closest,
        "srm": {k: (v.get("srm") or {}).get(k) for k in ("p_value", "mismatch")} if v.get("srm") else None,
        "worst_segments": [],
    }


#: Most distinct values a feature may have to be used as a segment in the root cause.
SEGMENT_MAX_VALUES = 12


def worst_segments(plan: dict[str, Any], pre: dict[str, Any], windows: list[tuple[datetime, datetime]],
                   metric_names: list[str], limit: int = 5) -> list[dict[str, Any]]:
    """Where the canary did worst: per low-cardinality feature value (e.g. ``country=4``), each metric's mean
    on the canary and on stable over the recorded windows, ranked by the harm-direction difference.

    Descriptive (no test): it points a human at the segment to look at first.
    """
    import json

    spec = _spec(plan)
    metrics = [m for m in spec.get("metrics", []) if m["name"] in metric_names] or list(spec.get("metrics", []))
    rows: list[dict[str, Any]] = []
    log = _log_hook(plan)
    for start, end in windows:
        rows += log.window_rows(_model(plan), start=start, end=end,
                                versions={"stable": pre["stable"], "canary": pre["candidate"]},
                                with_labels=True, with_features=True, limit=20000)
    feats: dict[str, set] = {}
    parsed = []
    for r in rows:
        try:
            f = json.loads(r.get("features") or "{}")
        except ValueError:
            f = {}
        parsed.append(f if isinstance(f, dict) else {})
        for k, val in parsed[-1].items():
            feats.setdefault(k, set()).add(val)
    segment_features = [k for k, vals in feats.items() if 1 < len(vals) <= SEGMENT_MAX_VALUES]
    baseline = pre.get("baseline") or {}
    out = []
    for m in metrics:
        thr = _threshold(m, baseline)
        sign = 1.0 if m.get("direction", "decrease") == "decrease" else -1.0
        for feat in segment_features:
            cells: dict[tuple[Any, str], list[float]] = {}
            for r, f in zip(rows, parsed, strict=True):
                x = metric_value(m, r, thr)
                if not math.isnan(x):
                    cells.setdefault((f.get(feat), r["arm"]), []).append(x)
            for value in {k[0] for k in cells}:
                c, st = cells.get((value, "canary"), []), cells.get((value, "stable"), [])
                if len(c) < 5 or len(st) < 5:
                    continue
                cm, sm = sum(c) / len(c), sum(st) / len(st)
                out.append({"metric": m["name"], "segment": f"{feat}={value:g}" if isinstance(value, float)
                            else f"{feat}={value}", "canary": cm, "stable": sm, "diff": cm - sm,
                            "harm": sign * (cm - sm), "n_canary": len(c), "n_stable": len(st)})
    out.sort(key=lambda d: -d["harm"])
    return [d for d in out if d["harm"] > 0][:limit]


def _step_windows(plan: dict[str, Any]) -> list[tuple[datetime, datetime]]:
    """The recorded (step start, last look) of every step of this run, from XCom (empty outside a task)."""
    from canary.hooks.timeutil import parse_ts

    out = []
    for i in range(1, len(_spec(plan).get("steps") or []) + 1):
        st = _xcom(f"step_{i}.set_traffic")
        look = (_xcom(f"step_{i}.analyze") or {}).get("look_at") or (_xcom(f"step_{i}.hold") or {}).get("look_at")
        if st and look:
            out.append((parse_ts(st["step_started_at"]), parse_ts(look)))
    return out


def _drift_text(d: dict[str, Any]) -> str:
    stat = "psi" if d.get("psi") is not None else "js"
    value = d.get(stat)
    shown = f"{float(value):.4g}" if value is not None else "-"
    return f"{d.get('feature')} {stat.upper()} {shown} vs threshold {float(d['threshold']):.4g}"


def root_cause_text(rc: dict[str, Any]) -> str:
    """The root cause as readable lines."""
    lines = [f"root cause: {rc.get('reason') or 'no verdict'}"]
    for f in rc["failing_metrics"]:
        lines.append(f"  metric {f['metric']}: canary {f['canary']} vs stable {f['stable']}, difference "
                     f"{f['difference']} (z {f['z_harm']} vs boundary {f['boundary']}, samples {f['samples']})"
                     + (" [circuit breaker]" if f["circuit_breaker"] else ""))
    for f in rc["data_quality_failures"]:
        lines.append(f"  data quality: {f}")
    for d in rc["top_drifting_features"]:
        lines.append(f"  drifting feature: {_drift_text(d)}")
    closest = rc.get("closest_to_drifting") or []
    if closest:
        lines.append("  no feature drifted; closest: " + "; ".join(_drift_text(d) for d in closest))
    for s in rc["worst_segments"]:
        lines.append(f"  worst segment for {s['metric']}: {s['segment']}: canary {s['canary']:.4g} "
                     f"(n={s['n_canary']}) vs stable {s['stable']:.4g} (n={s['n_stable']})")
    return "\n".join(lines)


def _to_zero(plan: dict[str, Any], candidate: str | None, why: str,
             generations: dict[int, float | None] | None = None) -> tuple[dict[str, Any] | None, bool]:
    """Canary share to 0 % (canary cleared) when the route's canary is ``candidate``; compare-and-set.

    :param generations: when given, the route generations this run wrote (with the share it wrote, or
        None): a route at any other generation, or at one of them with another share, is not this run's.
    :returns: ``(route after, changed)``. A route whose canary is some other version is left alone.
    """
    from canary.hooks.errors import RouteConflictError

    router = _router(plan)
    model = _model(plan)
    for _ in range(3):
        route = router.get_route(model)
        if route.canary_percent <= 0 and route.mode == "split":
            return route.to_dict(), False
        if candidate and route.canary and route.canary != candidate:
            _log("route of %s carries canary %s, not this run's %s: left alone", model, route.canary, candidate)
            return route.to_dict(), False
        if generations is not None and (
            route.generation not in generations
            or generations[route.generation] not in (None, route.canary_percent)
        ):
            _log("route of %s is at generation %s (%s at %g%%), which this run did not write (it wrote %s): "
                 "left alone", model, route.generation, route.canary, route.canary_percent,
                 sorted(generations) or "nothing")
            return route.to_dict(), False
        try:
            after = router.set_route(model, stable=route.stable, canary=None, canary_percent=0, mode="split",
                                     if_generation=route.generation)
        except RouteConflictError:
            continue  # the lease expired or a renewal raced us: read again
        _log("%s: canary of %s set to 0%% (was %s at %g%%)", why, model, route.canary, route.canary_percent)
        return after.to_dict(), True
    route = router.get_route(model)
    return route.to_dict(), False


def _payload(plan: dict[str, Any], pre: dict[str, Any] | None, decision: str, reason: str,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    pre = pre or {}
    return {"model": _model(plan), "candidate": pre.get("candidate") or plan.get("candidate"),
            "stable": pre.get("stable"), "decision": decision, "reason": reason, "run_id": plan.get("run_id"),
            "report_path": None, **(extra or {})}


def _notify(plan: dict[str, Any], event: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        from canary.notify import notify
    except ImportError:
        return []
    try:
        results = notify(event, payload, _spec(plan).get("notifications") or {})
    except Exception as exc:  # noqa: BLE001 - a notification never changes the outcome of the run
        _log("notification %s failed: %s", event, exc)
        return [{"channel": "all", "ok": False, "detail": str(exc)}]
    out = []
    for r in results:
        out.append(r.to_dict() if hasattr(r, "to_dict") else dict(getattr(r, "__dict__", {}) or {"result": str(r)}))
    return out


def _answer_text(answer: dict[str, Any] | None, chose: str) -> str:
    """How a paused run was decided, from ``decide_pause``'s XCom ``answer`` ('' when it did not pause)."""
    if not answer:
        return ""
    if answer.get("timed_out") or not answer.get("responded_by"):
        return "paused at the cap and nobody answered within the decision window: rolled back (the default)"
    return f"paused at the cap; {answer['responded_by']} chose {chose} at {answer.get('responded_at')}"


def rollback(plan: dict[str, Any], pre: dict[str, Any], verdict: dict[str, Any] | None,
             answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Canary to 0 % (compare-and-set), root-cause record, notify; then raise ``AirflowFailException``
    with the verdict's reason so the run ends failed and says why.

    :param answer: after ``on_inconclusive: pause``, the person's answer (``decide_pause``'s XCom
        ``answer``: ``chosen``, ``responded_by``, ``responded_at``, ``timed_out``); it leads the reason.
    """
    v = _unwrap_verdict(verdict)
    route, changed = _to_zero(plan, pre.get("candidate"), "rollback")
    rc = root_cause(v)
    try:
        rc["worst_segments"] = worst_segments(plan, pre, _step_windows(plan),
                                              [f["metric"] for f in rc["failing_metrics"]])
    except Exception as exc:  # noqa: BLE001 - the root cause is for humans; the rollback must not fail on it
        _log("worst segments not computed: %s", exc)
    reason = v.get("reason") or "inconclusive at the cap (on_inconclusive: rollback)"
    if answer:
        reason = f"{_answer_text(answer, 'roll back')} (the last look: {reason})"
        rc["reason"] = reason
    text = root_cause_text(rc)
    _log("rollback of %s %s:\n%s", _model(plan), pre.get("candidate"), text)
    notes = _notify(plan, "rollback", _payload(plan, pre, "rollback", reason))
    _push("rollback", {"route": route, "changed": changed, "root_cause": rc, "reason": reason,
                       "notifications": notes})
    raise _fail(f"rolled back {_model(plan)} {pre.get('candidate')} (canary at 0 %, stable {pre.get('stable')}): "
                f"{reason}")


def pause(plan: dict[str, Any], pre: dict[str, Any], verdict: dict[str, Any] | None) -> dict[str, Any]:
    """``on_inconclusive: pause`` at the cap: keep the current share for a person to decide.

    The share's lease is extended over the decision window (the run's ``hold.max_wait``) plus one lease, so
    the canary keeps serving while the ``decide_pause`` task waits for an answer (it runs no code while it
    waits and cannot renew); if Airflow is gone, the gateway still returns traffic to stable when that lease
    runs out. Notifies the owners (event ``pause``) with the reason and where to answer. Fails without
    waiting when this run's canary is no longer on the route (its lease ran out, someone changed it): there
    is nothing left to decide, and the fail-safe reports it.

    :returns: ``{"route", "reason", "decision_window_s", "lease_expires_at", "notifications"}``.
    """
    from canary.hooks.errors import RouteConflictError

    v = _unwrap_verdict(verdict)
    model, candidate = _model(plan), pre.get("candidate")
    router = _router(plan)
    route = router.get_route(model)
    if route.canary != candidate or route.canary_percent <= 0:
        raise _fail(
            f"pause: the canary {candidate} of {model} is no longer on the route (found canary={route.canary} at "
            f"{route.canary_percent:g}%, generation {route.generation}, updated {route.updated_at}): its lease ran "
            "out or someone changed the route, so traffic is already on stable and there is nothing to decide. "
            "Trigger a new rollout to try again."
        )
    window = hold_settings(plan).max_wait_s
    lease = int(window + _seconds(_spec(plan).get("lease", 900)))
    try:
        route = router.renew_lease(model, if_generation=route.generation, lease_seconds=lease)
    except RouteConflictError as exc:
        raise _fail(f"pause: the route of {model} changed while pausing ({exc}); not waiting for a decision") from exc
    reason = f"paused at the cap, inconclusive: {v.get('reason')}"
    ask = (f"{reason}. The canary keeps {route.canary_percent:g}% of traffic; answer Promote or Roll back in "
           f"Airflow (Required actions, task decide_pause) within {format_seconds(window)}; no answer rolls back.")
    _log("%s; route %s, lease until %s", ask, route.to_dict(), route.lease_expires_at)
    notes = _notify(plan, "pause", _payload(plan, pre, "pause", ask))
    return {"route": route.to_dict(), "reason": reason, "decision_window_s": window,
            "lease_expires_at": route.lease_expires_at, "notifications": notes}


def format_seconds(seconds: float) -> str:
    """``7200`` -> ``2h``, ``90`` -> ``90s``: durations for people."""
    from canary.spec import format_duration

    return format_duration(int(seconds))


def pause_question(plan: dict[str, Any], paused: dict[str, Any], window: float) -> tuple[str, str]:
    """Subject and Markdown body of the question a paused run asks in Airflow's Required actions."""
    spec = _spec(plan)
    route = paused.get("route") or {}
    candidate = route.get("canary") or plan.get("candidate")
    subject = f"{spec['model']}: canary {candidate} paused at {route.get('canary_percent', '?')}% - promote or roll back?"
    body = (
        f"**{paused.get('reason') or 'Inconclusive at the cap.'}**\n\n"
        f"Stable: `{route.get('stable')}`, canary: `{candidate}` at {route.get('canary_percent')}% "
        f"(its lease runs until {paused.get('lease_expires_at')}).\n\n"
        "The numbers could not decide within the step's cap: neither harm nor non-inferiority was shown on every "
        "metric. The last `analyze` task's log holds the decision record (per metric: estimates, interval, "
        "boundary, samples).\n\n"
        f"- **Promote**: the canary becomes stable (registry stage production).\n"
        f"- **Roll back**: the canary goes to 0 %; the run ends failed with this reason.\n\n"
        f"No answer within {format_seconds(window)} rolls back."
    )
    return subject, body


def promote(plan: dict[str, Any], pre: dict[str, Any], last_route: dict[str, Any] | None = None,
            answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """stable := candidate at 100 %, canary cleared, registry stage ``production``; the task emits the
    outlet Asset ``canary://<model>/promoted``.

    :param last_route: the last ``set_traffic`` XCom (optional): its generation must still be current.
    :param answer: after a pause, the person's answer (``decide_pause``'s XCom); named in the notification.
    :returns: ``{"route", "promoted_at", "stable", "previous_stable"}``.
    """
    model, candidate, stable = _model(plan), pre["candidate"], pre["stable"]
    router = _router(plan)
    route = router.get_route(model)
    if last_route and "route" in last_route:
        last_route = last_route["route"]
    if route.stable == candidate and not (route.canary_percent > 0):
        note = "already promoted (this task's earlier attempt)"
    else:
        expected = int(last_route["generation"]) if last_route else route.generation
        if route.generation != expected or route.canary != candidate or route.stable != stable:
            raise _fail(
                f"promote: the route of {model} is not what this run last wrote (expected generation {expected}, "
                f"stable {stable} canary {candidate}); found generation {route.generation}: stable={route.stable} "
                f"canary={route.canary} at {route.canary_percent:g}%. Not promoting."
            )
        route = router.set_route(model, stable=candidate, canary=None, canary_percent=0, mode="split",
                                 if_generation=route.generation)
        note = f"stable is now {candidate} (was {stable})"
    if answer:
        note = f"{note}; {_answer_text(answer, 'promote')}"
    router.set_stage(model, candidate, "production")
    _log("promote %s: %s; registry stage production; route %s", model, note, route.to_dict())
    _asset_extra(model, {"model": model, "version": candidate, "previous": stable, "run_id": plan.get("run_id"),
                         "promoted_at": route.updated_at})
    notes = _notify(plan, "promotion", _payload(plan, pre, "promote", note))
    return {"route": route.to_dict(), "promoted_at": route.updated_at, "stable": candidate,
            "previous_stable": stable, "notifications": notes}


def _asset_extra(model: str, extra: dict[str, Any]) -> None:
    """Attach ``extra`` to the task's outlet Asset event ``canary://<model>/promoted`` (the factory declares
    the outlet; Airflow emits the event when the task succeeds). Outside a task this does nothing."""
    ctx = _context()
    if ctx is None or "outlet_events" not in ctx:
        return
    from airflow.sdk import Asset

    try:
        ctx["outlet_events"][Asset(f"canary://{model}/promoted")].extra = extra
    except Exception as exc:  # noqa: BLE001 - the event itself is emitted by Airflow regardless
        _log("could not attach details to the promoted Asset event: %s", exc)


def drift_check(plan: dict[str, Any], pre: dict[str, Any], post: dict[str, Any] | None) -> dict[str, Any]:
    """Drift of the new stable's inputs and scores over the post-deployment window against the
    pre-rollout reference window (PSI with a sample-size-calibrated threshold, JS, KS)."""
    from canary.hooks.timeutil import parse_ts

    if not post or not post.get("window"):
        raise ValueError("drift_check needs the post_deploy_hold XCom with its 'window' [start, end]")
    spec_drift = _spec(plan).get("drift") or {}
    n = int(spec_drift.get("sample_size", 20000))
    ref_start, ref_end = (parse_ts(t) for t in pre["baseline"]["reference_window"])
    cur_start, cur_end = (parse_ts(t) for t in post["window"])
    reference = _feature_frames(plan, pre, ref_start, ref_end, {"stable": pre["stable"]}, n)
    current = _feature_frames(plan, pre, cur_start, cur_end, {"stable": pre["candidate"]}, n)
    from canary.analysis import drift

    features = _drift_features(plan, pre, reference if len(reference) else current)
    result = drift.compare_windows(reference, current, features, bins=int(spec_drift.get("bins", 10)),
                                   psi_floor=float(spec_drift.get("psi_floor", 0.1)))
    _log("drift of %s %s after promotion vs the pre-rollout reference (%d vs %d rows): %s", _model(plan),
         pre["candidate"], len(reference), len(current), result)
    return {"reference_window": pre["baseline"]["reference_window"], "window": post["window"],
            "reference_rows": int(len(reference)), "current_rows": int(len(current)), **_plain(result)}


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars, tuples, dataclasses, non-finite floats)."""
    import json

    return json_safe(json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else (
        o.to_dict() if hasattr(o, "to_dict") else str(o)))))


def report_dir() -> Path:
    """Where HTML reports go: ``$CANARY_REPORT_DIR`` or ``reports/`` next to ``plugins/``."""
    env = os.environ.get("CANARY_REPORT_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "reports"


def report(plan: dict[str, Any] | None, **upstream: Any) -> dict[str, Any]:
    """The final HTML report of the run (trigger rule ``all_done``: runs after success, rollback or
    failure). ``upstream`` holds whatever XComs exist (``pre``, ``analyses``, ``promoted``, ``drift``).

    Missing pieces are pulled from the running task's XComs (``steps``, ``holds``, ``rollback``).

    :returns: ``{"path": <path of the HTML report>}``.
    """
    from canary.report import build_run, write_report

    invalid = not plan
    plan = plan or _plan_of_invalid_run()
    pre = upstream.get("pre") or _xcom("preflight")
    n = len((plan.get("spec") or {}).get("steps") or [])
    steps = upstream.get("steps") or [_xcom(f"step_{i}.set_traffic") for i in range(1, n + 1)]
    holds = upstream.get("holds") or [_xcom(f"step_{i}.hold") for i in range(1, n + 1)]
    analyses = upstream.get("analyses") or [_xcom(f"step_{i}.analyze") for i in range(1, n + 1)]
    promoted = upstream.get("promoted") or _xcom("promote")
    drift = upstream.get("drift") or _xcom("drift_check")
    rolled = upstream.get("rollback") or _xcom("rollback", key="rollback")
    failed = upstream.get("fail_safe") or _xcom("fail_safe", key="fail_safe")
    paused = upstream.get("paused") or _xcom("pause")
    merged = []
    for st, hold in zip(steps, holds, strict=False):
        merged.append({**st, **({"look_at": hold.get("look_at")} if hold else {})} if st else None)
    if promoted:
        outcome, reason, final = "promoted", f"{pre and pre.get('candidate')} promoted to stable", 100.0
    elif rolled:
        outcome, reason, final = "rolled_back", rolled.get("reason"), 0.0
    elif paused:
        outcome, reason, final = "paused", paused.get("reason"), None
    elif failed or upstream.get("failed"):
        outcome, reason, final = "failed", (failed or {}).get("reason") or "a task failed", 0.0
    elif invalid:
        outcome, reason, final = ("failed", "the trigger conf or the spec did not validate: the validate task's "
                                  "log names the field, the value and the fix; traffic was not touched", None)
    elif not pre and plan:
        outcome, reason, final = "skipped", "pre-flight did not pass (see its log)", None
    else:
        outcome, reason, final = "failed", "the run did not reach a decision", None
    run = build_run(plan, pre, steps=merged, analyses=analyses, outcome=outcome, reason=reason,
                    final_percent=final, root_cause=(rolled or {}).get("root_cause"), drift=drift,
                    notifications=(rolled or {}).get("notifications") or (promoted or {}).get("notifications"))
    path = write_report(run, report_dir())
    _log("report of this run: %s", path)
    return {"path": str(path), "outcome": outcome}


def _plan_or_spec(plan: dict[str, Any] | None, spec_path: str | None) -> dict[str, Any] | None:
    if plan:
        return plan
    if not spec_path:
        return None
    try:
        from canary.spec import load_spec

        return {"spec": load_spec(spec_path).to_dict(), "candidate": None, "run_id": None}
    except Exception:  # noqa: BLE001 - an unreadable spec: nothing this run could have changed
        return None


def _written_routes(read: Any, n_steps: int) -> tuple[bool, dict[int, float | None]]:
    """What this run's ``set_traffic`` tasks wrote: ``(touched, {generation: canary percent})``.

    ``set_traffic`` records its intent (expected generation and target) before it writes the route, and the
    route after the change as its return value; a write that succeeded and then lost its XCom is still
    known from the intent (the gateway gives it generation ``expected + 1``).
    """
    touched, written = False, {}
    for i in range(1, n_steps + 1):
        intent = read(f"step_{i}.set_traffic", "intent")
        if intent:
            touched = True
            written.setdefault(int(intent["expected_generation"]) + 1, intent.get("canary_percent"))
        done = read(f"step_{i}.set_traffic")
        if done and (done.get("route") or {}).get("generation") is not None:
            touched = True
            written[int(done["route"]["generation"])] = done["route"].get("canary_percent")
    return touched, written


def fail_safe(
    plan: dict[str, Any] | None,
    spec_path: str | None = None,
    reason: str | None = None,
    candidate: str | None = None,
    *,
    run: tuple[str, str] | None = None,
    generations: dict[int, float | None] | None = None,
) -> dict[str, Any]:
    """Make traffic safe after any failure (canary share to 0 % when the gateway answers) and tell the owners
    once.

    Runs as the ``fail_safe`` task (trigger rule ``one_failed``) and from the DAG's ``on_failure_callback``
    (run timeout, a fail-safe task that could not finish), which passes ``run=(dag_id, run_id)`` because a
    callback is not a running task: the run's XComs are then read by run id (:func:`_run_xcom`). ``plan``
    is ``None`` when ``validate`` failed or a callback could not read it; the spec at ``spec_path`` still
    names the model, the router connection and the notification channels.

    Exactly this run's canary is taken off, never another run's or a person's:

    - the candidate is pre-flight's (XCom), the plan's, or ``candidate`` (the callback reads a manual run's
      from its conf): the route is left alone when it carries another version;
    - when the run's XComs are readable, the route must also be at a generation this run's ``set_traffic``
      wrote (with the share it wrote). A route that moved since (a lease expiry and another rollout of the
      same version, a person) is left alone; a run that never set traffic (refused in pre-flight, a bad
      spec) leaves the route as it is. ``generations`` adds generations the caller knows.

    Notifications, one per outcome: a run that rolled back was notified by :func:`rollback` (event
    ``rollback``, with the verdict's reason), so its fail-safe sends nothing; any other failure is sent as
    ``failure`` with what happened to traffic. The callback sends nothing when the ``fail_safe`` task
    already ran (its XCom): a crashed run is notified once. A callback that can read no XCom at all does
    notify (a second message is better than none after a run timeout).

    :returns: ``{"route": <route after, or None>, "reached_gateway", "changed", "reason", "notified":
        "failure" or None, "notifications"}``; also pushed as XCom ``fail_safe`` when run as a task.
    """
    from canary.hooks.errors import GatewayError

    reason = reason or "a task of the run failed"
    # Outside a task and without a run id (a test calling this directly) there are no XComs to consult.
    readable = run is not None or _context() is not None
    pre: dict[str, Any] = {}
    rolled = done = None
    touched, written = True, {}

    def read(task_id: str, key: str = "return_value") -> Any:
        return _run_xcom(run, task_id, key)

    if readable:
        try:
            if plan is None and run is not None:
                plan = read("validate")
            pre = read("preflight") or {}
            rolled = read("rollback", "rollback")
            done = read("fail_safe", "fail_safe") if run is not None else None
            if plan is not None:
                touched, written = _written_routes(read, len(_spec(plan).get("steps") or []))
            elif (from_file := _plan_or_spec(None, spec_path)) is not None:
                # validate left no plan (it failed): the spec file names the DAG's set_traffic tasks, so what
                # this run wrote is still read (nothing, as every traffic task runs after validate)
                touched, written = _written_routes(read, len(_spec(from_file).get("steps") or []))
        except XComUnreadable as exc:
            _log("fail-safe: %s; going by the run's conf and the spec only", exc)
            readable, pre, rolled, done, touched, written = False, {}, None, None, True, {}
    plan = _plan_or_spec(plan, spec_path)
    # Already told: the rollback (its own event) or the fail_safe task before this callback.
    tell = not rolled and not done

    def finish(out: dict[str, Any]) -> dict[str, Any]:
        out["notified"] = None
        out["notifications"] = []
        if tell and plan is not None:
            out["notified"] = "failure"
            out["notifications"] = _notify(plan, "failure", _payload(plan, pre, "fail_safe", out["reason"]))
        elif rolled:
            _log("fail-safe: the run rolled back and was notified as a rollback; no failure notification")
        elif done:
            _log("fail-safe: the fail_safe task already made traffic safe and notified; not again")
        if run is None:
            _push("fail_safe", out)
        return out

    if plan is None:
        return finish({"route": None, "reached_gateway": False, "changed": False,
                       "reason": f"{reason}; no plan and no readable spec: this run moved no traffic"})
    candidate = pre.get("candidate") or plan.get("candidate") or candidate
    if not touched:
        out = {"route": None, "reached_gateway": False, "changed": False,
               "reason": f"{reason}; this run failed before it set any route: it changed no traffic, and the "
                         "route is left as it is"}
        _log("fail-safe: %s", out["reason"])
        return finish(out)
    if not candidate:
        return finish({"route": None, "reached_gateway": False, "changed": False,
                       "reason": f"{reason}; no candidate is known, so the route is left to the gateway's "
                                 "lease (it returns traffic to stable when this run stops renewing it)"})
    mine = None
    if readable or generations:
        mine = {**written, **(generations or {})}
    try:
        route, changed = _to_zero(plan, candidate, "fail-safe", generations=mine)
    except GatewayError as exc:
        out = {"route": None, "reached_gateway": False, "changed": False,
               "reason": f"{reason}; the gateway did not answer ({exc}): its lease returns traffic to stable"}
        _log("fail-safe: %s", out["reason"])
        return finish(out)
    out = {"route": route, "reached_gateway": True, "changed": changed, "reason": reason}
    _log("fail-safe: %s; route %s", "canary set to 0 %" if changed else "route left as it is", route)
    return finish(out)
