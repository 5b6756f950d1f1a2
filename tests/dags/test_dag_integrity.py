"""DAG integrity: every spec gives one loadable DAG with the expected tasks, edges, tags, retries and form.

The DAGs are loaded the way Airflow loads them (``DagBag`` on ``dags/``) and serialized the way the DAG
processor does, so an error here is an error the Airflow UI would show.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import BranchPythonOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.serialization.serialized_objects import DagSerialization
from canary import runtime
from canary.dag_factory import BROKEN_TAG, ROLLOUTS_DIR_ENV, branch_target, build_dags
from canary.operators import AnalyzeOperator
from canary.sensors import HoldSensor, PostDeployHoldSensor
from canary.spec import PARAM_KEYS, RolloutSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
ROLLOUTS = REPO / "include" / "rollouts"
SPEC_FILES = sorted(ROLLOUTS.glob("*.yaml"))
SPECS = {load_spec(p).dag_id: load_spec(p) for p in SPEC_FILES}
#: Tasks where a retry cannot help (validation is deterministic) and so has none.
NO_RETRY_TASKS = {"validate"}


def load_bag(monkeypatch: pytest.MonkeyPatch, folder: Path | None = None) -> DagBag:
    if folder is None:
        monkeypatch.delenv(ROLLOUTS_DIR_ENV, raising=False)
    else:
        monkeypatch.setenv(ROLLOUTS_DIR_ENV, str(folder))
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def bag() -> DagBag:
    with pytest.MonkeyPatch.context() as mp:
        return load_bag(mp)


def expected_tasks(spec: RolloutSpec) -> set[str]:
    n = len(spec.steps)
    tasks = {"validate", "preflight", "rollback", "promote", "post_deploy_hold", "drift_check", "report", "fail_safe"}
    if spec.on_inconclusive == "pause":
        tasks |= {"pause", "decide_pause"}
    for i in range(1, n + 1):
        tasks |= {f"step_{i}.{t}" for t in ("set_traffic", "hold", "analyze", "decide", "to_rollback", "to_promote")}
        if spec.on_inconclusive == "pause":
            tasks.add(f"step_{i}.to_pause")
    return tasks


def expected_edges(spec: RolloutSpec) -> set[tuple[str, str]]:
    n = len(spec.steps)
    pausing = spec.on_inconclusive == "pause"
    edges = {("validate", "preflight"), ("preflight", "step_1.set_traffic")}
    for i in range(1, n + 1):
        s = f"step_{i}"
        edges |= {(f"{s}.set_traffic", f"{s}.hold"), (f"{s}.hold", f"{s}.analyze"), (f"{s}.analyze", f"{s}.decide")}
        edges |= {(f"{s}.decide", f"{s}.to_rollback"), (f"{s}.to_rollback", "rollback")}
        if pausing:
            edges |= {(f"{s}.decide", f"{s}.to_pause"), (f"{s}.to_pause", "pause")}
        edges |= {(f"{s}.decide", f"{s}.to_promote"), (f"{s}.to_promote", "promote")}
        if i < n:
            edges.add((f"{s}.decide", f"step_{i + 1}.set_traffic"))
    edges |= {("promote", "post_deploy_hold"), ("post_deploy_hold", "drift_check")}
    edges |= {("rollback", "report"), ("drift_check", "report")}
    if pausing:
        # a person's answer: decide_pause branches to promote or rollback (never a direct downstream of a
        # step's decide, which would skip it before anyone could answer)
        edges |= {("pause", "report"), ("pause", "decide_pause"), ("decide_pause", "promote"),
                  ("decide_pause", "rollback")}
    edges |= {(t, "fail_safe") for t in expected_tasks(spec) - {"report", "fail_safe"}}
    return edges


def test_no_import_errors_and_one_dag_per_spec(bag: DagBag) -> None:
    assert bag.import_errors == {}
    assert SPEC_FILES, "the project ships rollout specs"
    rollout_ids = {d for d in bag.dag_ids if d.startswith("canary_rollout__")}
    assert rollout_ids == set(SPECS)
    for dag_id in rollout_ids:
        assert BROKEN_TAG not in bag.dags[dag_id].tags


def test_dags_serialize_like_the_dag_processor_does(bag: DagBag) -> None:
    for dag in bag.dags.values():
        data = DagSerialization.to_dict(dag)
        assert data["dag"]["dag_id"] == dag.dag_id


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_tags_retries_and_run_settings(bag: DagBag, dag_id: str) -> None:
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    assert {"canary", "rollout", f"model:{spec.model}"} <= set(dag.tags)
    assert set(spec.tags) <= set(dag.tags)
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert dag.dagrun_timeout.total_seconds() == spec.deadline
    assert dag.on_failure_callback, "a run that times out or is marked failed must still make traffic safe"
    if spec.schedule is None:
        assert dag.timetable.can_be_scheduled is False
    else:
        assert dag.timetable.expression == spec.schedule
    for task in dag.tasks:
        retries = task.retries or 0  # None-safe
        if task.task_id in NO_RETRY_TASKS:
            assert retries == 0
        else:
            assert retries >= 2, f"{dag_id}.{task.task_id} has retries={task.retries!r}"


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_expected_tasks_operators_and_edges(bag: DagBag, dag_id: str) -> None:
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    assert set(dag.task_ids) == expected_tasks(spec)
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == expected_edges(spec)
    for i in range(1, len(spec.steps) + 1):
        assert isinstance(dag.get_task(f"step_{i}.hold"), HoldSensor)
        assert dag.get_task(f"step_{i}.hold").step_index == i
        assert isinstance(dag.get_task(f"step_{i}.analyze"), AnalyzeOperator)
        assert dag.get_task(f"step_{i}.analyze").step_index == i
        assert isinstance(dag.get_task(f"step_{i}.decide"), BranchPythonOperator)
        assert isinstance(dag.get_task(f"step_{i}.to_rollback"), EmptyOperator)
    assert isinstance(dag.get_task("post_deploy_hold"), PostDeployHoldSensor)
    rules = {t.task_id: str(getattr(t.trigger_rule, "value", t.trigger_rule)) for t in dag.tasks}
    assert rules["report"] == "all_done"
    assert rules["fail_safe"] == "one_failed"
    for shared in ("rollback", "promote", *(["pause"] if spec.on_inconclusive == "pause" else [])):
        assert rules[shared] == "none_failed_min_one_success"
    assert {getattr(o, "uri", None) for o in dag.get_task("promote").outlets} == {f"canary://{spec.model}/promoted"}
    if spec.on_inconclusive == "pause":
        from airflow.providers.standard.operators.hitl import HITLBranchOperator

        ask = dag.get_task("decide_pause")
        assert isinstance(ask, HITLBranchOperator) and ask.defaults == ["Roll back"], "no answer must roll back"
        assert set(ask.options_mapping.values()) == {"promote", "rollback"} <= ask.downstream_task_ids
    leaves = {t.task_id for t in dag.tasks if not t.downstream_task_ids}
    assert leaves == {"report", "fail_safe"}


@pytest.mark.parametrize("dag_id", sorted(SPECS))
@pytest.mark.parametrize("on_inconclusive", ["rollback", "pause"])
def test_every_branch_target_is_a_direct_downstream_of_its_decide(
    bag: DagBag, dag_id: str, on_inconclusive: str
) -> None:
    """runtime.decide can only choose tasks the branch can reach; otherwise the run would stall."""
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    n = len(spec.steps)
    for run_steps in range(1, n + 1):  # the trigger params may shorten the steps
        plan = {"spec": {**spec.to_dict(), "steps": list(spec.steps[:run_steps]), "on_inconclusive": on_inconclusive}}
        for i in range(1, run_steps + 1):
            decide = dag.get_task(f"step_{i}.decide")
            for decision in ("advance", "promote", "rollback", "extend", None):
                target = branch_target(plan, i, {"verdict": {"decision": decision}}, n)
                if target.endswith("to_pause") and spec.on_inconclusive != "pause":
                    continue  # this DAG's spec never pauses: its plan cannot say pause
                assert target in decide.downstream_task_ids, (i, decision, target)


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_trigger_form_schema_matches_the_spec(bag: DagBag, dag_id: str) -> None:
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    params = dag.params
    assert set(params.keys()) == set(PARAM_KEYS)
    for key in PARAM_KEYS:
        param = params.get_param(key)
        assert param.schema.get("title") and param.description, f"{key} needs a title and a description"
    defaults = spec.param_defaults()
    for key in ("steps", "hold_min_duration", "hold_min_samples", "hold_max_wait", "margins"):
        assert params[key] == defaults[key]
    steps = params.get_param("steps").schema
    assert steps["maxItems"] == len(spec.steps)
    assert steps["items"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 100}
    margins = params.get_param("margins").schema
    assert set(margins["properties"]) == {m.name for m in spec.metrics}
    assert margins["additionalProperties"] is False
    candidate = params.get_param("candidate")
    if spec.schedule is None:
        assert not candidate.has_value, "manual-only rollouts require the candidate in the form"
        assert candidate.schema["type"] == "string"
    else:
        assert candidate.value is None and "null" in candidate.schema["type"]
    # The form's schema itself rejects what it can: out-of-range percents, unknown metrics, bad names.
    for key, bad in (("steps", [150]), ("margins", {"nope": 1}), ("candidate", "../v2"), ("hold_min_samples", 0)):
        with pytest.raises(Exception):  # noqa: B017 - Airflow raises ParamValidationError
            params.get_param(key).resolve(bad)
    params.get_param("candidate").resolve("v2")


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_form_values_pass_validate(bag: DagBag, dag_id: str) -> None:
    """What the form submits by default (plus a candidate) is a valid run; without one only scheduled runs are."""
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    form = {k: dag.params[k] for k in PARAM_KEYS if k != "candidate"}
    plan = runtime.validate(spec.source, {**form, "candidate": "v2"}, None, "manual", "manual__1")
    assert plan["candidate"] == "v2" and plan["overrides"] == {} and plan["spec"] == spec.to_dict()
    scheduled = runtime.validate(spec.source, {**form, "candidate": None}, None, "scheduled", "scheduled__1")
    assert scheduled["candidate"] is None
    with pytest.raises(ValueError, match="must name the candidate version"):
        runtime.validate(spec.source, {**form, "candidate": None}, None, "manual", "manual__2")


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_doc_md_comes_from_the_spec(bag: DagBag, dag_id: str) -> None:
    dag, spec = bag.dags[dag_id], SPECS[dag_id]
    assert spec.description.split()[0] in dag.doc_md
    for m in spec.metrics:
        assert m.name in dag.doc_md


def test_broken_spec_breaks_only_its_own_dag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for p in SPEC_FILES:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "typo.yaml").write_text("model: typo\nhodl: {min_duration: 10m}\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "syntax.yaml").write_text("model: syntax\nsteps: [1, 5\n")
    (tmp_path / "fraud.yml").write_text("model: fraud\n")  # a second file for the same model
    bag = load_bag(monkeypatch, tmp_path)
    assert bag.import_errors == {}
    good = {d for d in SPECS if d != "canary_rollout__fraud"}
    for dag_id in good:
        assert set(bag.dags[dag_id].task_ids) == expected_tasks(SPECS[dag_id])
    expected_messages = {
        "canary_rollout__typo": "unknown key 'hodl'",
        "canary_rollout__empty": "the spec file is empty",
        "canary_rollout__syntax": "YAML syntax error at line",
        "canary_rollout__fraud": "more than one spec file",
    }
    for dag_id, fragment in expected_messages.items():
        dag = bag.dags[dag_id]
        assert BROKEN_TAG in dag.tags
        assert fragment in dag.description and fragment in dag.doc_md
        assert dag.task_ids == ["spec_error"]
        assert dag.timetable.can_be_scheduled is False
        with pytest.raises(AirflowFailException, match=fragment):
            dag.get_task("spec_error").python_callable()
        DagSerialization.to_dict(dag)


def test_worker_parse_builds_only_the_dag_of_its_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Airflow's parsing context set (a worker starting a task) only that DAG is built."""
    dag_id = sorted(SPECS)[0]
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", dag_id)
    assert list(build_dags(ROLLOUTS)) == [dag_id]
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "some_other_dag")
    assert set(build_dags(ROLLOUTS)) == set(SPECS)


def test_tasks_see_the_dag_params_at_run_time(bag: DagBag) -> None:
    """The form is attached after the tasks (parse speed); Airflow still merges it into every task's params."""
    from airflow.sdk.definitions.param import process_params

    for dag_id in SPECS:
        dag = bag.dags[dag_id]
        for task in dag.tasks:
            params = process_params(dag, task, {"candidate": "v2"}, suppress_exception=False)
            assert set(params) == set(PARAM_KEYS) and params["candidate"] == "v2"


def test_a_dag_that_fails_half_built_is_replaced_by_its_placeholder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A failure inside the DAG's construction (not a spec error) still breaks only that DAG."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext
    from canary import dag_factory

    real_hold = dag_factory.HoldSensor

    def hold(**kwargs: object) -> object:
        if DagContext.get_current().dag_id == "canary_rollout__bad":
            raise RuntimeError("boom while building")
        return real_hold(**kwargs)

    monkeypatch.setattr(dag_factory, "HoldSensor", hold)
    (tmp_path / "good.yaml").write_text("model: good\n")
    (tmp_path / "bad.yaml").write_text("model: bad\n")
    bag = load_bag(monkeypatch, tmp_path)
    assert bag.import_errors == {}
    assert BROKEN_TAG not in bag.dags["canary_rollout__good"].tags
    bad = bag.dags["canary_rollout__bad"]
    assert BROKEN_TAG in bad.tags and bad.task_ids == ["spec_error"]
    assert "RuntimeError: boom while building" in bad.description


def test_missing_spec_folder_gives_no_dags_and_no_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bag = load_bag(monkeypatch, tmp_path / "absent")
    assert bag.import_errors == {}
    assert not [d for d in bag.dag_ids if d.startswith("canary_rollout__")]


def test_parse_time_imports_nothing_heavy() -> None:
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(DAGS / 'canary_rollouts.py')!r})\n"
        "heavy = ['pandas', 'scipy', 'great_expectations', 'sklearn', 'matplotlib', 'psycopg2', 'canary.analysis',"
        " 'canary.hooks.prediction_log']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), f"imported at parse time: {out.stdout}"


def test_ruff_airflow_rules_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run(
        [str(ruff), "check", "--select", "AIR", "dags", "plugins"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
