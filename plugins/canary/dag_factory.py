"""Build one Airflow DAG per rollout spec, ``canary_rollout__<model>`` (Contract 4).

The shape of a run::

    validate -> preflight -> step_1 [set_traffic -> hold -> analyze -> decide] -> step_2 [...] -> ... -> promote
                                                               |  gates: to_rollback / to_pause / to_promote
                                                               v
                                                 rollback / pause        promote -> post_deploy_hold -> drift_check
    report (all_done) after rollback / pause / drift_check;  fail_safe (one_failed) after every other task

``decide`` is a branch. A branch skips its direct downstream tasks that it does not choose, so each step
reaches the shared ``rollback``, ``pause`` and ``promote`` through its own gate task; the shared tasks use
``none_failed_min_one_success``.

With ``on_inconclusive: pause``: ``pause`` (the share stays, its lease covers the decision window) ->
``decide_pause``, Airflow's Human-in-the-loop branch (:class:`canary.operators.pause.PauseDecisionOperator`):
a person answers *Promote* (-> ``promote``) or *Roll back* (-> ``rollback``) in the Required actions page;
no answer within the run's ``hold.max_wait`` rolls back. ``promote`` is a direct downstream of no step's
``decide``, so it is still runnable when the person answers.

The run's leaf tasks are ``report`` and ``fail_safe``. When anything failed, ``fail_safe`` makes traffic safe
and then fails itself, so a rolled-back or broken run never shows green. The DAG's ``on_failure_callback``
(run timeout, mark-failed) calls the same fail-safe.

Every task body is one call into :mod:`canary.runtime`; this module only wires tasks and formats the doc.
It is imported at parse time: standard library, PyYAML, ``airflow.sdk`` and the standard provider's
operators only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import DAG, Asset, Param, TaskGroup, TriggerRule, get_parsing_context
from airflow.sdk.exceptions import AirflowFailException

from canary import runtime
from canary.operators import AnalyzeOperator
from canary.sensors import HoldSensor, PostDeployHoldSensor
from canary.spec import NAME_RE, RolloutSpec, SpecError, format_duration, load_spec

__all__ = [
    "build_dag",
    "build_broken_dag",
    "build_dags",
    "branch_target",
    "discover_specs",
    "rollouts_dir",
    "trigger_params",
    "ROLLOUTS_DIR_ENV",
    "DAG_ID_PREFIX",
    "BROKEN_TAG",
]

log = logging.getLogger(__name__)

#: Environment variable that overrides the spec folder (benchmarks, tests, deployments with another layout).
ROLLOUTS_DIR_ENV = "CANARY_ROLLOUTS_DIR"
DAG_ID_PREFIX = "canary_rollout__"
BROKEN_TAG = "broken-spec"
#: Fixed and in the past: with catchup=False only the latest schedule interval runs.
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)
RETRIES = 2
RETRY_DELAY = timedelta(seconds=30)


# ------------------------------------------------------------------------------------------ discovery


def rollouts_dir(dag_file: str | Path | None = None) -> Path:
    """The spec folder: ``$CANARY_ROLLOUTS_DIR`` if set, else ``include/rollouts`` next to ``dags/``."""
    env = os.environ.get(ROLLOUTS_DIR_ENV)
    if env:
        return Path(env)
    base = Path(dag_file).resolve().parent.parent if dag_file else Path(__file__).resolve().parents[2]
    return base / "include" / "rollouts"


def discover_specs(folder: str | Path) -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` file in ``folder`` (not hidden), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        log.warning("rollout spec folder %s does not exist: no rollout DAGs", folder)
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def build_dags(folder: str | Path) -> dict[str, DAG]:
    """One DAG per spec file in ``folder``; a broken spec gives a placeholder DAG with its error instead.

    A broken spec never raises here: an exception in a DAG file would hide *every* rollout DAG of the file
    (Airflow marks all DAGs of a file with an import error as stale), so the error is shown on the broken
    spec's own DAG (description, docs, a failing ``spec_error`` task) and logged by the DAG processor.
    """
    paths = discover_specs(folder)
    by_id: dict[str, list[Path]] = {}
    for path in paths:
        by_id.setdefault(_dag_id_for_file(path), []).append(path)
    # A worker starting a task parses the file for one DAG only (Airflow's parsing context): build just it.
    wanted = get_parsing_context().dag_id
    if wanted and wanted in by_id:
        by_id = {wanted: by_id[wanted]}
    dags: dict[str, DAG] = {}
    for dag_id, group in by_id.items():
        if len(group) > 1:
            names = ", ".join(p.name for p in group)
            message = (
                f"{names}: more than one spec file for the DAG {dag_id}. Fix: keep one file per model "
                f"(<model>.yaml) and delete or rename the others."
            )
            dags[dag_id] = build_broken_dag(group[0], message)
            continue
        path = group[0]
        try:
            dag = build_dag(path)
            dag.validate()
        except SpecError as exc:
            log.error("rollout spec %s is invalid; its DAG %s only shows the error:\n%s", path, dag_id, exc)
            dag = build_broken_dag(path, str(exc))
        except Exception as exc:  # keep the other rollout DAGs loadable whatever went wrong with this one
            log.exception("could not build the rollout DAG from %s", path)
            dag = build_broken_dag(
                path, f"{path.name}: the DAG could not be built: {type(exc).__name__}: {exc}"
            )
        dags[dag.dag_id] = dag
    return dags


def _dag_id_for_file(path: Path) -> str:
    stem = (
        path.stem
        if NAME_RE.match(path.stem)
        else re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:64] or "unnamed"
    )
    return DAG_ID_PREFIX + stem


# --------------------------------------------------------------------------------------- trigger form


def trigger_params(spec: RolloutSpec) -> dict[str, Param]:
    """The trigger form: candidate version and overrides of steps, holds and margins (JSON schema).

    The form is prefilled with the spec's own values, so submitting it unchanged changes nothing. For a
    spec without a schedule the candidate is required by the form itself; for a scheduled spec it must be
    optional (Airflow refuses a schedule with required params), and ``validate`` requires it for runs
    triggered by hand while scheduled runs pick the newest registered version.
    """
    defaults = spec.param_defaults()
    version_schema = {"pattern": NAME_RE.pattern, "minLength": 1, "maxLength": 64}
    candidate_doc = (
        "The model version to roll out (a folder under the gateway's model directory, e.g. v2). "
        "Required when you trigger the rollout by hand."
    )
    if spec.schedule is None:
        candidate = Param(
            type="string", title="Candidate version", description=candidate_doc, **version_schema
        )
    else:
        candidate = Param(
            None,
            type=["null", "string"],
            title="Candidate version",
            description=candidate_doc
            + f" Scheduled runs ({spec.schedule}) leave it empty: they pick the newest registered version "
            "newer than stable, and skip when there is none.",
            **version_schema,
        )
    duration_schema = {
        "type": ["string", "integer"],
        "pattern": r"^\s*\d+(\.\d+)?\s*[smhd]?\s*$",
        "minimum": 0,
    }
    metric_props = {
        m.name: {
            "type": "number",
            "minimum": 0,
            "title": m.name,
            "description": f"{m.kind} metric from {m.source}, {m.margin_type} margin"
            + (" (relative: fraction of stable's value)" if m.margin_type == "relative" else ""),
        }
        for m in spec.metrics
    }
    return {
        "candidate": candidate,
        "steps": Param(
            defaults["steps"],
            type="array",
            items={"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            minItems=1,
            maxItems=len(spec.steps),
            title="Traffic steps (percent)",
            description="Canary share of each step, strictly increasing, 0 < p <= 100. "
            f"From the spec: {defaults['steps']}. You may give fewer steps than the spec, not more.",
        ),
        "hold_min_duration": Param(
            defaults["hold_min_duration"],
            title="Hold: minimum duration per step",
            description="How long each step holds at least before its first look: seconds or 30s / 10m / 2h "
            f"/ 1d. From the spec: {defaults['hold_min_duration']}.",
            **duration_schema,
        ),
        "hold_min_samples": Param(
            defaults["hold_min_samples"],
            type="integer",
            minimum=1,
            title="Hold: minimum requests per arm",
            description="Requests each arm (stable and canary) needs before a look. "
            f"From the spec: {defaults['hold_min_samples']}.",
        ),
        "hold_max_wait": Param(
            defaults["hold_max_wait"],
            title="Hold: maximum wait per step",
            description="Cap of each step: the look happens at the cap even without enough samples, and an "
            "inconclusive step stops extending there (then the spec's on_inconclusive applies: "
            f"{spec.on_inconclusive}). From the spec: {defaults['hold_max_wait']}.",
            **duration_schema,
        ),
        "margins": Param(
            defaults["margins"],
            type="object",
            properties=metric_props,
            additionalProperties=False,
            title="Non-inferiority margins per metric",
            description="How much worse the canary may be on each metric and still be promoted (>= 0; "
            f"absolute in the metric's unit, or relative). From the spec: {defaults['margins']}.",
        ),
    }


# ------------------------------------------------------------------------------------------ task bodies
# Module-level callables (not closures) keep the DAG cheap to build and the tasks easy to read in the UI.


def _pull(context: dict[str, Any], task_id: str) -> Any:
    return context["ti"].xcom_pull(task_ids=task_id)


def _validate(spec_path: str, **context: Any) -> dict[str, Any]:
    dag_run = context.get("dag_run")
    return runtime.validate(
        spec_path,
        dict(context.get("params") or {}),
        context.get("logical_date"),
        getattr(dag_run, "run_type", None),
        context.get("run_id"),
    )


def _preflight(**context: Any) -> dict[str, Any]:
    return runtime.preflight(_pull(context, "validate"))


def _set_traffic(step_index: int, **context: Any) -> dict[str, Any]:
    last = _pull(context, f"step_{step_index - 1}.set_traffic") if step_index > 1 else None
    return runtime.set_traffic(
        _pull(context, "validate"), _pull(context, "preflight"), step_index, (last or {}).get("route")
    )


def branch_target(
    plan: dict[str, Any], step_index: int, analysis: dict[str, Any] | None, dag_steps: int
) -> str:
    """The task the ``decide`` branch of step ``step_index`` follows: :func:`canary.runtime.decide`'s choice,
    with ``promote`` routed through this step's ``to_promote`` gate. ``promote`` is a direct downstream of no
    ``decide``: a branch skips the direct downstream tasks it does not choose, and a skipped ``promote``
    could not run later when a person answers *Promote* after a pause (or the trigger params shortened the
    steps, so an earlier step promotes). ``dag_steps`` is kept for callers; every step has the gate."""
    target = runtime.decide(plan, step_index, analysis)
    if target == "promote":
        return f"step_{step_index}.to_promote"
    return target


def _decide(step_index: int, dag_steps: int, **context: Any) -> str:
    return branch_target(
        _pull(context, "validate"), step_index, _pull(context, f"step_{step_index}.analyze"), dag_steps
    )


def _analyses(context: dict[str, Any], dag_steps: int) -> list[Any]:
    return [_pull(context, f"step_{i}.analyze") for i in range(1, dag_steps + 1)]


def _verdict(context: dict[str, Any], dag_steps: int) -> dict[str, Any] | None:
    analysis = runtime.latest_analysis(_analyses(context, dag_steps))
    return (analysis or {}).get("verdict")


def _answer(context: dict[str, Any]) -> dict[str, Any] | None:
    """A person's answer after a pause (``decide_pause``'s XCom ``answer``), None when the run did not pause."""
    return context["ti"].xcom_pull(task_ids="decide_pause", key="answer")


def _rollback(dag_steps: int, **context: Any) -> dict[str, Any]:
    return runtime.rollback(
        _pull(context, "validate"), _pull(context, "preflight"), _verdict(context, dag_steps),
        answer=_answer(context),
    )


def _pause(dag_steps: int, **context: Any) -> dict[str, Any]:
    return runtime.pause(
        _pull(context, "validate"), _pull(context, "preflight"), _verdict(context, dag_steps)
    )


def _promote(**context: Any) -> dict[str, Any]:
    return runtime.promote(_pull(context, "validate"), _pull(context, "preflight"), answer=_answer(context))


def _drift_check(**context: Any) -> dict[str, Any]:
    return runtime.drift_check(
        _pull(context, "validate"), _pull(context, "preflight"), _pull(context, "post_deploy_hold")
    )


def _report(dag_steps: int, **context: Any) -> dict[str, Any]:
    return runtime.report(
        _pull(context, "validate"),
        pre=_pull(context, "preflight"),
        analyses=_analyses(context, dag_steps),
        promoted=_pull(context, "promote"),
        post=_pull(context, "post_deploy_hold"),
        drift=_pull(context, "drift_check"),
    )


def _failed_tasks(context: dict[str, Any]) -> list[str]:
    """Task ids of this run that failed (for the fail-safe's reason); empty when Airflow cannot tell."""
    ti = context.get("ti")
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])
    except Exception:
        return []
    per_run = states.get(ti.run_id, states) if isinstance(states, dict) else {}
    return sorted(t for t, s in per_run.items() if str(getattr(s, "value", s)) == "failed")


def _fail_safe(spec_path: str, **context: Any) -> None:
    failed = _failed_tasks(context)
    reason = f"failed task(s): {', '.join(failed)}" if failed else "an upstream task failed"
    result = runtime.fail_safe(_pull(context, "validate"), spec_path, reason)
    raise AirflowFailException(
        f"rollout run failed ({reason}); fail-safe done, traffic is safe: {result}. "
        "See the failed task's log for the cause and the report for the evidence."
    )


class _FailSafeCallback:
    """The DAG's ``on_failure_callback``: make traffic safe after a run timeout, or when the ``fail_safe``
    task itself could not finish, and notify a failure nobody was told about.

    A callback is not a running task, so it hands :func:`canary.runtime.fail_safe` the run's id: the plan,
    pre-flight's candidate (a scheduled run's is only known there) and the route generations this run
    wrote are read from the run's XComs by id, and only a route this run wrote is touched. The run's conf
    names a manual run's candidate for when no XCom can be read. Never raises (a callback that raises hides
    the original failure); errors are logged.
    """

    def __init__(self, spec_path: str) -> None:
        self.spec_path = spec_path

    def __call__(self, context: dict[str, Any]) -> None:
        run = None
        try:
            dag_run = context.get("dag_run")
            dag = context.get("dag")
            dag_id = getattr(dag, "dag_id", None) or getattr(dag_run, "dag_id", None)
            run_id = context.get("run_id") or getattr(dag_run, "run_id", None)
            run = (str(dag_id), str(run_id)) if dag_id and run_id else None
        except Exception as exc:
            log.warning("fail-safe callback could not tell which run failed (%s)", exc)
        candidate = None
        try:
            conf = getattr(context.get("dag_run"), "conf", None) or {}
            candidate = conf.get("candidate") or None
        except Exception as exc:
            log.warning("fail-safe callback could not read the run's conf (%s)", exc)
        try:
            runtime.fail_safe(None, self.spec_path, str(context.get("reason") or "the run failed"),
                              candidate=candidate, run=run)
        except Exception:
            log.exception("fail-safe callback for %s could not make traffic safe", self.spec_path)


def _spec_error(message: str) -> None:
    raise AirflowFailException(message)


# ------------------------------------------------------------------------------------------------ DAGs


def build_dag(spec_path: str | Path) -> DAG:
    """The rollout DAG of one spec file. Raises :class:`canary.spec.SpecError` when the spec is invalid."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    path = str(spec_path)
    n = len(spec.steps)
    pausing = spec.on_inconclusive == "pause"
    default_args = {
        "owner": spec.owner,
        "retries": RETRIES,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    }
    with DAG(
        dag_id=spec.dag_id,
        description=_one_line(spec.description) or f"Canary rollout of the {spec.model} model",
        doc_md=spec_doc_md(spec),
        schedule=spec.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(seconds=spec.deadline),
        default_args=default_args,
        tags=_tags(spec),
        on_failure_callback=_FailSafeCallback(path),
        # Registered through the DAG file's globals only: a DAG whose build fails half-way must not be
        # auto-registered next to its placeholder (two DAGs with one id would be an import error).
        auto_register=False,
    ) as dag:
        validate = PythonOperator(
            task_id="validate",
            python_callable=_validate,
            op_kwargs={"spec_path": path},
            retries=0,  # a spec or trigger-param error does not fix itself on retry
            execution_timeout=timedelta(minutes=2),
            doc_md="Load the spec, merge the trigger params, validate both. Nothing moves before this passes.",
        )
        preflight = PythonOperator(
            task_id="preflight",
            python_callable=_preflight,
            execution_timeout=timedelta(minutes=15),
            doc_md="Candidate exists and loads, offline eval gate, route as expected, baseline and power plan.",
        )
        validate >> preflight

        previous = preflight
        gates_rollback, gates_pause, gates_promote = [], [], []
        decides = []
        for i in range(1, n + 1):
            with TaskGroup(group_id=f"step_{i}", tooltip=f"traffic step {i}: {spec.steps[i - 1]} %"):
                set_traffic = PythonOperator(
                    task_id="set_traffic",
                    python_callable=_set_traffic,
                    op_kwargs={"step_index": i},
                    execution_timeout=timedelta(minutes=5),
                    doc_md=f"Set the canary share to {spec.steps[i - 1]} % (absolute, compare-and-set, leased).",
                )
                hold = HoldSensor(task_id="hold", step_index=i)
                analyze = AnalyzeOperator(task_id="analyze", step_index=i)
                decide = BranchPythonOperator(
                    task_id="decide",
                    python_callable=_decide,
                    op_kwargs={"step_index": i, "dag_steps": n},
                    doc_md="Branch on the verdict: next step, promote, rollback or pause.",
                )
                set_traffic >> hold >> analyze >> decide
                to_rollback = EmptyOperator(task_id="to_rollback")
                decide >> to_rollback
                gates_rollback.append(to_rollback)
                if pausing:
                    to_pause = EmptyOperator(task_id="to_pause")
                    decide >> to_pause
                    gates_pause.append(to_pause)
                to_promote = EmptyOperator(task_id="to_promote")
                decide >> to_promote
                gates_promote.append(to_promote)
            previous >> set_traffic
            previous = decide
            decides.append(decide)

        rollback = PythonOperator(
            task_id="rollback",
            python_callable=_rollback,
            op_kwargs={"dag_steps": n},
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            execution_timeout=timedelta(minutes=5),
            doc_md="Canary to 0 %, root cause, notify; the run then fails with the verdict's reason.",
        )
        gates_rollback >> rollback
        terminal = [rollback]
        promote = PythonOperator(
            task_id="promote",
            python_callable=_promote,
            outlets=[Asset(f"canary://{spec.model}/promoted")],
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            execution_timeout=timedelta(minutes=5),
            doc_md="stable := candidate at 100 %, registry stage production, Asset event.",
        )
        gates_promote >> promote
        if pausing:
            from canary.operators.pause import PauseDecisionOperator  # HITL: only DAGs that pause import it

            pause = PythonOperator(
                task_id="pause",
                python_callable=_pause,
                op_kwargs={"dag_steps": n},
                trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
                execution_timeout=timedelta(minutes=5),
                doc_md="Inconclusive at the cap: keep the share, its lease extended over the decision window "
                "(hold.max_wait); notify the owners to decide.",
            )
            decide_pause = PauseDecisionOperator(
                task_id="decide_pause",
                promote_task_id="promote",
                rollback_task_id="rollback",
                doc_md="A person chooses Promote or Roll back (Required actions); no answer within the run's "
                "hold.max_wait rolls back.",
            )
            gates_pause >> pause >> decide_pause >> [promote, rollback]
            terminal.append(pause)
        post_deploy_hold = PostDeployHoldSensor(task_id="post_deploy_hold")
        drift_check = PythonOperator(
            task_id="drift_check",
            python_callable=_drift_check,
            execution_timeout=timedelta(minutes=30),
            doc_md="Drift of the new stable against the pre-rollout reference window.",
        )
        promote >> post_deploy_hold >> drift_check
        terminal.append(drift_check)

        report = PythonOperator(
            task_id="report",
            python_callable=_report,
            op_kwargs={"dag_steps": n},
            trigger_rule=TriggerRule.ALL_DONE,
            execution_timeout=timedelta(minutes=15),
            doc_md="The run's HTML report, whatever the outcome.",
        )
        terminal >> report
        fail_safe = PythonOperator(
            task_id="fail_safe",
            python_callable=_fail_safe,
            op_kwargs={"spec_path": path},
            trigger_rule=TriggerRule.ONE_FAILED,
            retries=3,
            execution_timeout=timedelta(minutes=5),
            doc_md="After any failure: canary to 0 % when the gateway answers; then fails so the run is failed.",
        )
        [t for t in dag.tasks if t.task_id not in ("report", "fail_safe")] >> fail_safe
    # The trigger form is attached after the tasks exist: every operator created while a DAG has params
    # deep-copies them (about 1 ms per task, most of the parse time of 50 specs). Tasks do not need their
    # own copy: at run time Airflow merges the DAG's params and the run conf into each task's context
    # (airflow.sdk.definitions.param.process_params). Assigning runs the DAG's params validator too.
    dag.params = trigger_params(spec)
    return dag


def build_broken_dag(spec_path: str | Path, message: str) -> DAG:
    """A placeholder for a spec that does not validate: the error is its description, its docs, and the
    failure of its only task. It has no schedule and touches no traffic."""
    spec_path = Path(spec_path)
    dag_id = _dag_id_for_file(spec_path)
    first = message.splitlines()[1].strip(" -") if "\n" in message else message
    fenced = message.replace("```", "'''")
    with DAG(
        dag_id=dag_id,
        description=f"BROKEN rollout spec {spec_path.name}: {first}"[:500],
        doc_md=(
            f"# Broken rollout spec `{spec_path.name}`\n\n"
            "This DAG only reports the error; fix the spec file and the rollout DAG comes back on the next "
            f"parse.\n\n```text\n{fenced}\n```\n\nReference: docs/spec.md."
        ),
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["canary", BROKEN_TAG],
        auto_register=False,
        default_args={"retries": 0},
    ) as dag:
        # a partial, not op_kwargs: op_kwargs are Jinja-templated and the message may contain "{{"
        PythonOperator(task_id="spec_error", python_callable=functools.partial(_spec_error, message))
    return dag


# ------------------------------------------------------------------------------------------- doc_md


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 200 else line[:197] + "..."


def _tags(spec: RolloutSpec) -> list[str]:
    tags = ["canary", "rollout", f"model:{spec.model}"]
    if spec.schedule:
        tags.append("scheduled")
    return list(dict.fromkeys([*tags, *spec.tags]))


def _rows(rows: Iterable[tuple[str, ...]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def spec_doc_md(spec: RolloutSpec) -> str:
    """The DAG's documentation: the spec's description and its options, as Markdown."""
    h = spec.hold
    metrics = _rows(
        (
            m.name,
            m.source,
            m.kind + (f" ({m.threshold})" if m.threshold is not None else ""),
            m.direction,
            f"{m.margin} {m.margin_type}",
            "yes" if m.critical else "no",
            format_duration(m.label_delay) if m.needs_labels else "-",
        )
        for m in spec.metrics
    )
    return (
        f"# Canary rollout of `{spec.model}`\n\n{spec.description.strip()}\n\n"
        f"Spec: `{Path(spec.source).name}` (reference: docs/spec.md). Owner: {spec.owner}. "
        f"Trigger with the candidate version in the form; schedule: {spec.schedule or 'none (manual only)'}.\n\n"
        f"**Steps**: {' → '.join(f'{p} %' for p in spec.steps)}, each holding at least "
        f"{format_duration(h.min_duration)} and {h.min_samples} requests per arm, at most "
        f"{format_duration(h.max_wait)}; inconclusive at the cap: **{spec.on_inconclusive}**. "
        f"Lease {format_duration(spec.lease)}, deadline {format_duration(spec.deadline)}.\n\n"
        f"**Error rates**: rollback {spec.alpha.rollback}, promotion {spec.alpha.promotion}, SRM {spec.srm.alpha}, "
        f"circuit breaker {'on at ' + str(spec.circuit_breaker.alpha) if spec.circuit_breaker.enabled else 'off'}."
        f"\n\n| metric | source | kind | direction | margin | critical | label delay |\n"
        f"| --- | --- | --- | --- | --- | --- | --- |\n{metrics}\n\n"
        f"After promotion: watch {format_duration(spec.post_deploy.window)} and "
        f"{spec.post_deploy.min_samples} requests, then a drift check against the pre-rollout window."
    )
