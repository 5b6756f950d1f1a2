"""Pre-flight checks the data-quality suite against the real gateway before any route change: a suite GX
cannot build, or one naming a column the canary's rows will not have, stops the run with the fix."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException
from canary import runtime
from canary.analysis.quality import DEFAULT_DIR
from canary.hooks.router import TrafficRouterHook


@pytest.fixture
def suite_dir(tmp_path, monkeypatch):
    """A private CANARY_EXPECTATIONS_DIR with the fraud suite changed by ``write(name, change)``."""
    folder = tmp_path / "expectations"
    folder.mkdir()
    monkeypatch.setenv("CANARY_EXPECTATIONS_DIR", str(folder))

    def write(name, change):
        suite = json.loads((DEFAULT_DIR / "fraud.json").read_text())
        suite["name"] = name
        change(suite["expectations"])
        (folder / f"{name}.json").write_text(json.dumps(suite))

    return write


@pytest.fixture
def plan_with_suite(router_conn, set_conn, tmp_path):
    set_conn("canary_test_log", conn_type="sqlite", host=str(tmp_path / "log.db"))

    def make(suite):
        plan = runtime.validate("include/rollouts/fraud.yaml", {"candidate": "v2"}, None, "manual", "test-run")
        plan["spec"]["connections"] = {"router": router_conn, "prediction_log": "canary_test_log"}
        plan["spec"]["data_quality"] = {"suite": suite, "sample_size": 100}
        return plan

    return make


def _refused(plan, router_conn) -> str:
    """Pre-flight's refusal message of ``plan``, checking the route is left exactly as it was."""
    before = TrafficRouterHook(router_conn).get_route("fraud")
    with pytest.raises(AirflowFailException) as info:
        runtime.preflight(plan)
    assert TrafficRouterHook(router_conn).get_route("fraud") == before
    return str(info.value)


def test_preflight_refuses_a_suite_column_the_rows_will_not_have(plan_with_suite, suite_dir, router_conn):
    def rename(exps):
        exps.append({"type": "expect_column_values_to_be_between",
                     "kwargs": {"column": "amout", "min_value": 0.0}})
    suite_dir("fraud_cols", rename)
    message = _refused(plan_with_suite("fraud_cols"), router_conn)
    assert "data-quality suite 'fraud_cols'" in message and "fraud_cols.json" in message
    assert "expect_column_values_to_be_between(amout)" in message and "did you mean 'amount'?" in message
    assert "Nothing was changed" in message and "correct the column name in the suite file" in message
    assert "latency_ms" in message  # the columns the rows do have are listed


def test_preflight_refuses_a_suite_gx_cannot_build(plan_with_suite, suite_dir, router_conn):
    def typo(exps):
        exps[12]["type"] = "expect_column_value_to_be_between"
    suite_dir("fraud_typo", typo)
    message = _refused(plan_with_suite("fraud_typo"), router_conn)
    assert "fraud_typo.json" in message and "expectations[12]" in message
    assert "unknown expectation type 'expect_column_value_to_be_between'" in message
    assert "did you mean 'expect_column_values_to_be_between'?" in message and "Nothing was changed" in message
