"""The rollout DAG's control flow under each verdict, run with ``dag.test()`` in Airflow itself.

What is real: the DAG file, the factory, Airflow's scheduler logic in ``dag.test()`` (branching, skips,
trigger rules, run state, the metadata database). What is replaced: the bodies behind the DAG's one seam,
``canary.runtime`` and the hold/analyze operators' ``execute``, by recorders that return a scripted verdict
per step. The real bodies need a gateway and a prediction log; they are exercised end to end by the
runtime's own tests. This file answers one question: for every verdict, does the run take the right path,
touch traffic only after validation, and end in the right state?
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from canary import dag_factory, runtime
from canary.operators import AnalyzeOperator
from canary.sensors import HoldSensor, PostDeployHoldSensor
from pause_answer import PauseAnswer
from rollouts_folder import rollouts_folder

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "canary_rollouts.py"
SPEC = "model: wire\nsteps: [5, 50]\non_inconclusive: pause\n"


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from rollouts_folder(tmp_path_factory, "wire", SPEC)


class Recorder:
    """Stands in for the runtime bodies: records each call, returns a scripted verdict per step."""

    def __init__(self, decisions: dict[int, str]) -> None:
        self.decisions = decisions
        self.calls: list[str] = []
        self.rollback_verdict: dict[str, Any] | None = None
        self.fail_safe_calls: list[tuple[Any, Any]] = []  # (plan, reason): the task, then the DAG callback
        self.fail_safe_candidates: list[Any] = []
        self.fail_safe_runs: list[Any] = []  # None for the task; (dag_id, run_id) for the DAG callback
        self.answers: dict[str, Any] = {}  # the pause answer promote / rollback received

    def install(self, mp: pytest.MonkeyPatch) -> None:
        rec = self

        def preflight(plan: dict[str, Any]) -> dict[str, Any]:
            rec.calls.append("preflight")
            return {"stable": "v1", "candidate": plan["candidate"], "generation": 1}

        def set_traffic(plan: dict[str, Any], pre: dict[str, Any], i: int, last: Any = None) -> dict[str, Any]:
            rec.calls.append(f"set_traffic:{plan['spec']['steps'][i - 1]}")
            return {"route": {"generation": 1 + i}, "step_started_at": "2026-01-01T00:00:00+00:00"}

        def rollback(plan: dict[str, Any], pre: dict[str, Any], verdict: Any, answer: Any = None) -> dict[str, Any]:
            rec.calls.append("rollback")
            rec.rollback_verdict = verdict
            rec.answers["rollback"] = answer
            raise AirflowFailException(f"rolled back: {verdict['reason']}")

        def fail_safe(plan: Any, spec_path: Any = None, reason: Any = None, candidate: Any = None, *,
                      run: Any = None, generations: Any = None) -> dict[str, Any]:
            rec.calls.append("fail_safe")
            rec.fail_safe_calls.append((plan, reason))
            rec.fail_safe_candidates.append(candidate)
            rec.fail_safe_runs.append(run)
            return {"route": None, "reached_gateway": True, "reason": reason}

        mp.setattr(runtime, "preflight", preflight)
        mp.setattr(runtime, "set_traffic", set_traffic)
        mp.setattr(runtime, "rollback", rollback)
        mp.setattr(runtime, "fail_safe", fail_safe)
        mp.setattr(runtime, "pause", lambda plan, pre, verdict: rec.calls.append("pause") or {
            "reason": "paused at the cap, inconclusive", "route": {"stable": "v1", "canary": "v2", "canary_percent": 50}})
        def promote(plan: dict[str, Any], pre: dict[str, Any], *a: Any, answer: Any = None) -> dict[str, Any]:
            rec.calls.append("promote")
            rec.answers["promote"] = answer
            return {"stable": "v2"}

        mp.setattr(runtime, "promote", promote)
        mp.setattr(runtime, "drift_check", lambda plan, pre, post: rec.calls.append("drift_check") or {})
        mp.setattr(runtime, "report", lambda plan, **kw: rec.calls.append("report") or {"path": "r.html"})

        def analyze(op: AnalyzeOperator, context: Any) -> dict[str, Any]:
            decision = rec.decisions[op.step_index]
            return {"verdict": {"decision": decision, "reason": f"{decision} at step {op.step_index}"}}

        mp.setattr(HoldSensor, "execute", lambda op, context: {"look_at": "2026-01-01T00:10:00+00:00"})
        mp.setattr(AnalyzeOperator, "execute", analyze)
        mp.setattr(PostDeployHoldSensor, "execute", lambda op, context: {"look_at": "2026-01-01T01:00:00+00:00"})
        mp.setattr(dag_factory, "RETRIES", 0)  # a failure is the outcome under test, not a flake


def run(spec_path: Path, mp: pytest.MonkeyPatch, decisions: dict[int, str], conf: dict[str, Any]) -> tuple:
    rec = Recorder(decisions)
    rec.install(mp)
    dag = dag_factory.build_dag(spec_path)
    dag_run = dag.test(run_conf=conf)
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}
    return str(getattr(dag_run.state, "value", dag_run.state)), states, rec


def test_advance_then_promote(spec_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, states, rec = run(spec_path, monkeypatch, {1: "advance", 2: "promote"}, {"candidate": "v2"})
    assert state == "success"
    assert rec.calls == ["preflight", "set_traffic:5", "set_traffic:50", "promote", "drift_check", "report"]
    for task in ("promote", "post_deploy_hold", "drift_check", "report"):
        assert states[task] == "success"
    assert states["step_2.to_promote"] == "success"
    for task in ("rollback", "pause", "decide_pause", "fail_safe", "step_1.to_rollback", "step_2.to_rollback",
                 "step_1.to_promote"):
        assert states[task] == "skipped"


def test_rollback_at_the_first_step_fails_the_run_and_runs_the_fail_safe(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, states, rec = run(spec_path, monkeypatch, {1: "rollback", 2: "promote"}, {"candidate": "v2"})
    assert state == "failed"
    assert rec.calls[:3] == ["preflight", "set_traffic:5", "rollback"]
    assert "set_traffic:50" not in rec.calls and "promote" not in rec.calls
    assert rec.rollback_verdict == {"decision": "rollback", "reason": "rollback at step 1"}
    assert states["step_1.to_rollback"] == "success"
    assert states["rollback"] == "failed"
    assert states["step_2.set_traffic"] == "skipped" and states["promote"] == "skipped"
    assert states["fail_safe"] == "failed", "fail_safe secures traffic, then fails so the run is not green"
    (task_plan, task_reason), (_, callback_reason) = rec.fail_safe_calls
    assert task_plan["candidate"] == "v2" and "rollback" in task_reason
    assert callback_reason == "task_failure", "the DAG's on_failure_callback makes traffic safe too"
    assert rec.fail_safe_candidates[-1] == "v2", "the callback names this run's candidate (from the run's conf)"
    task_run, callback_run = rec.fail_safe_runs
    assert task_run is None and callback_run[0] == "canary_rollout__wire" and callback_run[1].startswith("manual__"), (
        "the callback names the run, so the fail-safe reads its XComs (candidate, generations) by run id"
    )
    assert states["report"] == "success"


def test_inconclusive_at_the_cap_pauses_and_a_person_promotes(spec_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    person = PauseAnswer("canary_rollout__wire", "Promote")
    person.start()
    state, states, rec = run(spec_path, monkeypatch, {1: "advance", 2: "extend"}, {"candidate": "v2"})
    person.join(5)
    assert person.error is None, person.error
    assert person.asked["options"] == ["Promote", "Roll back"] and person.asked["defaults"] == ["Roll back"]
    assert person.asked["subject"].startswith("wire: canary v2 paused at 50% - promote or roll back?")
    assert rec.calls == ["preflight", "set_traffic:5", "set_traffic:50", "pause", "promote", "drift_check", "report"]
    assert states["step_2.to_pause"] == "success" and states["pause"] == "success"
    assert states["decide_pause"] == "success" and states["promote"] == "success"
    assert states["rollback"] == "skipped" and states["fail_safe"] == "skipped"
    assert rec.answers["promote"]["chosen"] == "Promote" and rec.answers["promote"]["responded_by"] == "alice"
    assert rec.answers["promote"]["timed_out"] is False
    assert state == "success"


def test_a_pause_nobody_answers_rolls_back_at_the_end_of_the_window(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision window is the run's hold.max_wait (3 s here, from the trigger form); then the scheduler's
    timeout sweep applies the default, Roll back, and the run ends failed like any rollback."""
    person = PauseAnswer("canary_rollout__wire", None)
    person.start()
    started = time.monotonic()
    state, states, rec = run(spec_path, monkeypatch, {1: "advance", 2: "extend"},
                             {"candidate": "v2", "hold_min_duration": 1, "hold_max_wait": 3})
    person.join(5)
    assert person.error is None, person.error
    assert rec.calls[:5] == ["preflight", "set_traffic:5", "set_traffic:50", "pause", "rollback"]
    assert "promote" not in rec.calls
    assert states["decide_pause"] == "success" and states["rollback"] == "failed" and states["promote"] == "skipped"
    assert rec.answers["rollback"]["timed_out"] is True and rec.answers["rollback"]["responded_by"] is None
    assert state == "failed"
    assert time.monotonic() - started >= 3


def test_trigger_params_can_shorten_the_steps(spec_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, states, rec = run(spec_path, monkeypatch, {1: "promote"}, {"candidate": "v2", "steps": [10]})
    assert state == "success"
    assert rec.calls == ["preflight", "set_traffic:10", "promote", "drift_check", "report"]
    assert states["step_1.to_promote"] == "success" and states["promote"] == "success"
    assert states["step_2.set_traffic"] == "skipped"


def test_invalid_trigger_params_touch_no_traffic(spec_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, states, rec = run(spec_path, monkeypatch, {1: "advance", 2: "promote"}, {"candidate": "v2", "steps": [50, 5]})
    assert state == "failed"
    assert states["validate"] == "failed"
    assert "preflight" not in rec.calls and not [c for c in rec.calls if c.startswith("set_traffic")]
    assert sorted(rec.calls) == ["fail_safe", "fail_safe", "report"]  # the task, the DAG callback, the report
    assert [plan for plan, _ in rec.fail_safe_calls] == [None, None]
    assert states["preflight"] == "upstream_failed" and states["fail_safe"] == "failed"


def test_broken_spec_as_the_dag_processor_records_it(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Parse and write to the metadata DB like the DAG processor: the good DAG is active and triggerable,
    the broken spec's DAG carries its error, and the DAG file has no import error (which would make Airflow
    mark every DAG of the file stale and refuse to trigger them)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session

    (tmp_path / "good.yaml").write_text("model: good\n")
    (tmp_path / "bad.yaml").write_text("model: bad\nhodl: {min_duration: 10m}\n")
    monkeypatch.setenv(dag_factory.ROLLOUTS_DIR_ENV, str(tmp_path))
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    bundle = next(b for b in manager.get_all_dag_bundles() if Path(b.path).resolve() == DAG_FILE.parent)
    bag = BundleDagBag(dag_folder=str(DAG_FILE.parent), bundle_path=bundle.path, bundle_name=bundle.name)
    assert bag.import_errors == {}
    sync_bag_to_db(bag, bundle.name, None)
    with create_session() as session:
        models = {
            dm.dag_id: dm
            for dm in session.query(DagModel).filter(
                DagModel.dag_id.in_(["canary_rollout__good", "canary_rollout__bad"])
            )
        }
        assert set(models) == {"canary_rollout__good", "canary_rollout__bad"}
        for dm in models.values():
            assert not dm.has_import_errors and not dm.is_stale
        assert "unknown key 'hodl'" in models["canary_rollout__bad"].description
        errors = session.query(ParseImportError).filter(ParseImportError.filename == DAG_FILE.name).count()
        assert errors == 0
