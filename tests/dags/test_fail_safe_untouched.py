"""A run that fails in ``validate`` says it changed no traffic, from the ``fail_safe`` task and the DAG callback.

Real: the DAG, ``dag.test()``, the metadata database, ``runtime.validate`` (it refuses the conf) and
``runtime.fail_safe`` itself, reading the run's XComs in the task and by run id in the callback. The only
wrapper is a spy that keeps what ``runtime.fail_safe`` returned; nothing reaches the gateway, since the run
wrote no route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from canary import dag_factory, runtime
from rollouts_folder import rollouts_folder

SPEC = "model: quiet\nsteps: [5, 50]\n"


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from rollouts_folder(tmp_path_factory, "quiet", SPEC)


@pytest.mark.parametrize(
    ("conf", "why"),
    [
        ({"candidate": "v2", "steps": [50, 5]}, "steps not increasing"),
        ({"candidate": "v2", "hold_min_duration": "3h"}, "max_wait below min_duration; the callback knows v2"),
    ],
    ids=["bad-steps", "short-max-wait-with-candidate"],
)
def test_a_run_refused_by_validate_says_it_changed_no_traffic(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, conf: dict[str, Any], why: str
) -> None:
    real = runtime.fail_safe
    results: list[tuple[Any, dict[str, Any]]] = []  # (run given to fail_safe, what it returned)

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = real(*args, **kwargs)
        results.append((kwargs.get("run"), out))
        return out

    monkeypatch.setattr(runtime, "fail_safe", spy)
    monkeypatch.setattr(dag_factory, "RETRIES", 0)
    monkeypatch.setenv("CANARY_REPORT_DIR", str(tmp_path))
    dag_run = dag_factory.build_dag(spec_path).test(run_conf=conf)
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}
    assert states["validate"] == "failed", why
    assert states["fail_safe"] == "failed" and states["preflight"] == "upstream_failed"

    # the fail_safe task (run None, XComs through its context), then the DAG callback (run id, metadata DB)
    assert [run for run, _ in results] == [None, ("canary_rollout__quiet", dag_run.run_id)], results
    for _run, out in results:
        assert out["route"] is None and out["reached_gateway"] is False and out["changed"] is False
        assert "this run failed before it set any route: it changed no traffic" in out["reason"], out["reason"]
        assert "lease" not in out["reason"], "a run that never set a route has no lease to leave traffic to"
    task_out, callback_out = (out for _, out in results)
    assert task_out["notified"] == "failure", "the owners hear of the failure once, from the task"
    assert callback_out["notified"] is None, "the callback sees the task's fail_safe XCom and stays quiet"
