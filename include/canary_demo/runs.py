"""Run one rollout with ``dag.test()`` and read back what happened: states, verdicts, route, report.

Airflow is imported inside the functions: the caller sets ``AIRFLOW_HOME`` and the connections in the
environment first (Airflow reads its configuration on first import).
"""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from canary_demo.scenario import RolloutCase
from canary_demo.stack import REPO, DemoError

DAG_FILE = REPO / "dags" / "canary_rollouts.py"
_STEP_ANALYZE = re.compile(r"^step_(\d+)\.analyze$")
_STEP_SET = re.compile(r"^step_(\d+)\.set_traffic$")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


@dataclass
class Look:
    """One analysis of a step, as recorded in XCom."""

    step: int
    decision: str | None
    reason: str | None
    record: str | None
    count: int = 1  # looks the step took (each extend is one more)
    seconds: float | None = None  # from the step's start to its deciding look


@dataclass
class RolloutResult:
    """What one rollout did, read back from Airflow's metadata DB and the gateway.

    :param case: the case that was run.
    :param run_id: the DAG run id.
    :param state: the DAG run's final state (``success`` / ``failed``).
    :param seconds: wall time of ``dag.test()``.
    :param task_states: task id -> state.
    :param looks: the analyses in step order.
    :param steps: the canary percent of every step that set traffic.
    :param route: the gateway's route after the run.
    :param report_path: the HTML report (from the ``report`` task's XCom), or None.
    :param errors: the exceptions raised by failed tasks (from the run's log), first line each.
    :param log_path: the full log of the run.
    :param problems: why the outcome is not the expected one (empty when it is).
    """

    case: RolloutCase
    run_id: str
    state: str
    seconds: float
    task_states: dict[str, str]
    looks: list[Look]
    steps: list[float]
    route: dict[str, Any]
    report_path: str | None
    errors: list[str]
    log_path: Path
    xcoms: dict[str, Any] = field(default_factory=dict, repr=False)
    notifications: list[str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """``promoted``, ``rolled_back`` or ``failed`` as seen from the task states."""
        if self.task_states.get("promote") == "success" and self.state == "success":
            return "promoted"
        if self.task_states.get("rollback") in {"success", "failed"}:
            return "rolled_back"
        return "failed"

    @property
    def reason(self) -> str | None:
        """Why the run ended as it did: the rollback's reason, else the last analysis's."""
        rollback = self.xcoms.get("rollback:rollback") or {}
        if isinstance(rollback, dict) and rollback.get("reason"):
            return str(rollback["reason"])
        return self.looks[-1].reason if self.looks else None

    @property
    def ok(self) -> bool:
        return not self.problems


def load_dag(dag_id: str):
    """The DAG ``dag_id`` built by ``dags/canary_rollouts.py`` (parsed like the DAG processor does)."""
    from airflow.sdk import DAG

    if not DAG_FILE.exists():
        raise DemoError(f"{DAG_FILE} does not exist yet: the DAG factory (issue 3) has not landed")
    namespace = runpy.run_path(str(DAG_FILE))
    dags = {v.dag_id: v for v in namespace.values() if isinstance(v, DAG)}
    if dag_id not in dags:
        raise DemoError(f"{DAG_FILE} defines no DAG {dag_id!r} (it defines {sorted(dags) or 'none'})")
    return dags[dag_id]


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so Airflow's task logs too) to
    ``path``; yields a stream that still writes to the console."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()


class RouteWatcher(threading.Thread):
    """Prints every change of the model's route while a rollout runs (live progress on the console)."""

    def __init__(self, get_route: Callable[[], dict[str, Any]], out: TextIO, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="route-watcher")
        self._get_route = get_route
        self._out = out
        self._interval = interval
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        last = None
        while not self._halt.is_set():
            try:
                r = self._get_route()
                key = (r.get("stable"), r.get("canary"), r.get("canary_percent"), r.get("mode"))
                if key != last:
                    last = key
                    canary = f", canary {r.get('canary')} at {r.get('canary_percent'):g} %" if r.get("canary") else ""
                    self._out.write(
                        f"    [{time.monotonic() - self._t0:5.0f} s] route: stable {r.get('stable')}{canary} "
                        f"(generation {r.get('generation')})\n"
                    )
            except Exception as exc:  # the gateway may be busy; keep watching
                self._out.write(f"    route watcher: {type(exc).__name__}\n")
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def read_run(dag_id: str, run_id: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Task states and XComs of one DAG run: ``task_id`` for return values, ``task_id:key`` for others."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}
        rows = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)
        ).all()
        xcoms = {row.task_id if row.key == "return_value" else f"{row.task_id}:{row.key}": row.value for row in rows}
    return states, xcoms


def _latest_run(dag_id: str) -> tuple[str, Any] | None:
    """(run id, state) of the newest run of ``dag_id``, or None."""
    from airflow.models.dagrun import DagRun
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        run = session.scalars(
            select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)
        ).first()
        return (run.run_id, run.state) if run is not None else None


def _step_seconds(xcoms: dict[str, Any], analyze_task: str, value: dict[str, Any]) -> float | None:
    """Seconds from the step's traffic change to its deciding look (None when a time is missing)."""
    from canary.hooks.timeutil import parse_ts

    started = (xcoms.get(analyze_task.replace(".analyze", ".set_traffic")) or {}).get("step_started_at")
    try:
        return (parse_ts(value["look_at"]) - parse_ts(started)).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _errors_in_log(path: Path, since: int) -> list[str]:
    """First line of every distinct exception the run's tasks raised (from the log written since ``since``)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    seen: list[str] = []
    for line in text.splitlines():
        m = _EXC_LINE.match(line.strip())
        if m and line.strip() not in seen:
            seen.append(line.strip()[:400])
    return seen[:6]


def run_case(
    case: RolloutCase,
    dag_id: str,
    get_route: Callable[[], dict[str, Any]],
    log_path: Path,
) -> RolloutResult:
    """Run ``case`` with ``dag.test(run_conf=case.conf())``; the task logs go to ``log_path``."""
    dag = load_dag(dag_id)
    since = log_path.stat().st_size if log_path.exists() else 0
    started = time.monotonic()
    test_error = None
    before = _latest_run(dag_id)
    with output_to(log_path) as out:
        watcher = RouteWatcher(get_route, out)
        watcher.start()
        try:
            dag_run = dag.test(run_conf=case.conf())
            run_id, state = dag_run.run_id, dag_run.state
        except Exception as exc:  # dag.test itself broke (e.g. in a DAG callback): read the run back
            test_error = f"dag.test raised {type(exc).__name__}: {exc}"
            latest = _latest_run(dag_id)
            if latest is None or latest == before:
                raise DemoError(f"{test_error} before a DAG run was created; see {log_path}") from None
            run_id, state = latest
        finally:
            watcher.stop()
    seconds = time.monotonic() - started
    state = str(getattr(state, "value", state))
    states, xcoms = read_run(dag_id, run_id)

    looks = []
    for task_id in sorted((t for t in xcoms if _STEP_ANALYZE.match(t)), key=lambda t: int(_STEP_ANALYZE.match(t)[1])):
        value = xcoms[task_id] or {}
        verdict = value.get("verdict") or {}
        looks.append(Look(int(_STEP_ANALYZE.match(task_id)[1]), verdict.get("decision"), verdict.get("reason"),
                          value.get("record"), int(value.get("look_count") or 1), _step_seconds(xcoms, task_id,
                                                                                               value)))
    steps = []
    for task_id in sorted((t for t in xcoms if _STEP_SET.match(t)), key=lambda t: int(_STEP_SET.match(t)[1])):
        value = xcoms[task_id] or {}
        pct = value.get("percent", (value.get("route") or {}).get("canary_percent"))
        if pct is not None:
            steps.append(float(pct))
    report = xcoms.get("report") or {}
    route = get_route()
    return RolloutResult(
        case=case, run_id=run_id, state=state, seconds=seconds, task_states=states, looks=looks, steps=steps,
        route=route, report_path=report.get("path") if isinstance(report, dict) else None,
        errors=([test_error] if test_error else []) + _errors_in_log(log_path, since), log_path=log_path,
        xcoms=xcoms,
    )


def check(result: RolloutResult, stable_before: str) -> list[str]:
    """Why ``result`` is not what its case expects (empty list when it is)."""
    case, route = result.case, result.route
    problems = []
    if result.outcome != case.expect:
        problems.append(f"expected the candidate {case.candidate} to be {case.expect.replace('_', ' ')}, "
                        f"but the run ended {result.state} with outcome {result.outcome}")
    if case.expect == "promoted":
        if result.state != "success":
            problems.append(f"the DAG run state is {result.state}, not success")
        if route.get("stable") != case.candidate:
            problems.append(f"the route's stable is {route.get('stable')}, not the promoted {case.candidate}")
        if not result.looks or result.looks[-1].decision != "promote":
            problems.append("the last analysis did not decide promote")
    else:
        if result.state != "failed":
            problems.append(f"a rolled-back run must end failed (with its reason); it ended {result.state}")
        if route.get("stable") != stable_before:
            problems.append(f"the route's stable changed to {route.get('stable')} (expected {stable_before})")
        last = result.looks[-1] if result.looks else None
        if last is None or last.decision != "rollback" or not last.reason:
            problems.append(
                "the judge did not decide rollback on evidence"
                + (f" (the last look said {last.decision}: {last.reason}; the rollback came from the spec's "
                   "on_inconclusive at the cap)" if last is not None and result.outcome == "rolled_back" else "")
            )
    if float(route.get("canary_percent") or 0) != 0.0:
        problems.append(f"the canary still has {route.get('canary_percent')} % of the traffic after the run")
    if result.notifications is not None:
        event = "promotion" if case.expect == "promoted" else "rollback"
        if event not in result.notifications:
            problems.append(f"no {event} notification reached the webhook (received: {result.notifications})")
    if not result.report_path or not Path(result.report_path).is_file():
        problems.append(f"no HTML report was written (report task XCom: {result.report_path!r})")
    return problems
