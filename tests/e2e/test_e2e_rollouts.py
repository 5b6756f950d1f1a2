"""Whole rollouts with dag.test() against the real gateway and simulator traffic (holds of seconds)."""

from __future__ import annotations

from pathlib import Path

from conftest import write_e2e_spec


def _assert_rolled_back(stack, result, *, reason_has: str) -> None:
    assert result.state == "failed", result.summary()
    assert result.states["rollback"] == "failed", result.summary()  # rollback ends the run failed, with the reason
    assert result.states["promote"] in ("skipped", "upstream_failed"), result.summary()
    decisions = result.decisions()
    assert decisions and decisions[-1] == "rollback", result.summary()
    rolled = result.xcoms["rollback:rollback"]
    assert reason_has in rolled["reason"], rolled["reason"]
    assert rolled["root_cause"]["reason"] == rolled["reason"]
    route = stack.route()
    assert route["stable"] == "v1" and route["canary_percent"] == 0, route
    assert result.xcoms["report"]["outcome"] == "rolled_back"
    assert Path(result.xcoms["report"]["path"]).is_file()


def _feature_order_bug(stack, version: str = "v7") -> str:
    """A candidate with a classic production bug: stable's artifact registered with two of its features
    listed in each other's place (amount and account_age_days). Its offline metrics (copied metadata) look as
    good as stable's and its scores stay in range (data quality passes); online it is wrong about 2.4 times
    as often (measured offline on generated data: 25.6 % vs 10.6 % mistakes)."""
    import json
    import shutil

    src, dst = stack.model_dir / "fraud" / "v1", stack.model_dir / "fraud" / version
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    names = list(meta["features"])
    i, j = names.index("amount"), names.index("account_age_days")
    names[i], names[j] = names[j], names[i]
    meta.update(version=version, stage="candidate", features=names)
    (dst / "metadata.json").write_text(json.dumps(meta))
    return version


def test_worse_candidate_is_rolled_back_with_postgres_log(make_stack):
    stack = make_stack("postgres")
    candidate = _feature_order_bug(stack)
    stack.start_traffic()
    result = stack.run({"candidate": candidate, "steps": [50]})
    _assert_rolled_back(stack, result, reason_has="harm shown on")
    rc = result.xcoms["rollback:rollback"]["root_cause"]
    assert rc["failing_metrics"], rc
    worse = rc["failing_metrics"][0]
    assert worse["canary"] > worse["stable"], worse  # every metric here is "lower is better"


def test_broken_candidate_is_rolled_back_by_data_quality_even_with_retried_tasks(make_stack, tmp_path):
    """v4 gives NaN scores above an amount cap: data quality rolls it back at its first look. On the way, the
    first try of step_1.set_traffic changes the route and then fails, and the first try of step_1.analyze
    decides and then fails: their retries find the change in place (no second step, same start time) and
    reach the same verdict from the same recorded windows."""
    from datetime import timedelta

    # Only the label metric stays in this test's spec: v4 is also slower (+6 ms) and fails on country 4,
    # and with 10 s clusters the latency or error-rate harm is shown at the first look, often before a NaN
    # score is among the few canary rows. Here data quality is what must catch it.
    rollouts = write_e2e_spec(tmp_path / "dq_rollouts", drop_metrics=("error_rate", "latency_p95_exceed"))
    stack = make_stack("sqlite", rollouts=rollouts)
    stack.start_traffic()
    first_try: dict[str, object] = {}

    def flaky_once(task_id, original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if task_id not in first_try:
                first_try[task_id] = out
                raise RuntimeError(f"injected fault after {task_id} did its work")
            return out
        return wrapper

    def instrument(dag):
        tasks = {t.task_id: t for t in dag.tasks}
        st, an = tasks["step_1.set_traffic"], tasks["step_1.analyze"]
        st.python_callable = flaky_once("step_1.set_traffic", st.python_callable)
        an._look = flaky_once("step_1.analyze", an._look)
        for task in (st, an):
            task.retries, task.retry_delay, task.retry_exponential_backoff = 1, timedelta(seconds=1), False

    result = stack.run({"candidate": "v4"}, instrument=instrument)
    _assert_rolled_back(stack, result, reason_has="")
    rolled = result.xcoms["rollback:rollback"]
    assert "data quality failed on the canary's rows" in rolled["reason"], rolled["reason"]
    assert any("score" in str(f) for f in rolled["root_cause"]["data_quality_failures"]), rolled["root_cause"]

    assert set(first_try) == {"step_1.set_traffic", "step_1.analyze"}, "both faults were injected"
    pre, first, final = result.xcoms["preflight"], first_try["step_1.set_traffic"], result.xcoms["step_1.set_traffic"]
    assert first["route"]["generation"] == pre["generation"] + 1  # one change only
    assert final["route"]["generation"] == first["route"]["generation"]
    assert final["step_started_at"] == first["step_started_at"]
    assert result.xcoms["step_1.analyze"]["verdict"] == first_try["step_1.analyze"]["verdict"]
    assert result.xcoms["step_1.analyze"]["record"] == first_try["step_1.analyze"]["record"]


def test_good_candidate_is_promoted(make_stack):
    """Promotion end to end with the whole fraud spec (error rate, latency, mistake rate): non-inferior on
    every metric, promote (route, registry, Asset event), post-deployment hold, drift check against the
    pre-rollout window, report.

    The candidate is the demo's good one (canary_demo.candidate: more accurate than v1 and faster per
    call), judged under the spec's own margins. Neither arm makes errors, so the critical error-rate metric
    has zero events: it must still be tested (judge's variance floor), not block the promotion.
    """
    from canary_demo.candidate import register_good_candidate

    stack = make_stack("sqlite")
    candidate = register_good_candidate(stack.model_dir).name
    stack.start_traffic()
    result = stack.run({"candidate": candidate, "steps": [50]})
    assert result.state == "success", result.summary()
    assert result.states["promote"] == "success"
    assert result.decisions()[-1] == "promote", result.summary()
    last = result.xcoms["step_1.analyze"]["verdict"]
    error_rate = next(m for m in last["metrics"] if m["name"] == "error_rate")
    assert error_rate["tested"] and error_rate["non_inferior"], error_rate
    route = stack.route()
    assert route["stable"] == candidate and route["canary"] is None and route["canary_percent"] == 0
    fraud = next(m for m in requests_json(stack, "/v1/models")["models"] if m["model"] == "fraud")
    versions = {v["version"]: v for v in fraud["versions"]}
    assert versions[candidate]["stage"] == "production" and versions["v1"]["stage"] == "archived"
    assert result.xcoms["post_deploy_hold"]["counts"]["stable"]["requests"] >= 20
    drift = result.xcoms["drift_check"]
    assert drift["current_rows"] > 0 and drift["reference_rows"] > 0 and "drifted" in drift
    assert result.xcoms["report"]["outcome"] == "promoted" and Path(result.xcoms["report"]["path"]).is_file()
    assert promoted_asset_events(candidate), "no canary://fraud/promoted Asset event was recorded"


def requests_json(stack, path):
    import requests

    return requests.get(f"{stack.gateway.url}{path}", timeout=10).json()


def promoted_asset_events(version):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        rows = session.execute(
            select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "canary://fraud/promoted")
        ).all()
    return [r.extra for r in rows if (r.extra or {}).get("version") == version]
