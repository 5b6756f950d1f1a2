"""Bad trigger confs from the form fail before any route change, and the route is checked unchanged.

Two layers refuse them: the trigger form's JSON schema (Airflow refuses to create the run: a negative margin),
and the DAG's own checks (`validate`: steps not increasing; `preflight`, the first task that asks the registry:
unknown version, candidate equal to stable). Either way no `set_traffic` ever starts.
"""

from __future__ import annotations

import pytest

BAD_CONFS = [
    ("unknown version", {"candidate": "v99"}, "preflight"),
    ("steps not increasing", {"candidate": "v2", "steps": [50, 10]}, "validate"),
    ("negative margin", {"candidate": "v2", "margins": {"error_rate": -0.01}}, "form"),
    ("candidate equal to stable", {"candidate": "v1"}, "preflight"),
]


def test_bad_confs_fail_before_any_route_change(make_stack):
    from airflow.sdk.exceptions import ParamValidationError

    stack = make_stack("sqlite")
    before = stack.route()
    assert before["stable"] == "v1" and before["canary_percent"] == 0
    for title, conf, refused_by in BAD_CONFS:
        if refused_by == "form":
            with pytest.raises(ParamValidationError, match="margins"):
                stack.run(conf)
        else:
            result = stack.run(conf)
            assert result.state == "failed", f"{title}: {result.summary()}"
            assert result.states.get(refused_by) == "failed", f"{title}: {result.summary()}"
            assert not any(t.endswith("set_traffic") and s not in ("None", "upstream_failed", "skipped")
                           for t, s in result.states.items()), f"{title}: {result.states}"
            assert "step_1.set_traffic:intent" not in result.xcoms, f"{title}: set_traffic was attempted"
            fail_safe = result.xcoms.get("fail_safe:fail_safe") or {}
            assert fail_safe.get("changed") is False, f"{title}: {fail_safe}"
            report = result.xcoms.get("report") or {}
            assert report.get("outcome") in ("failed", "skipped"), f"{title}: {report}"
            # named after the model and this run, even when validate failed (not one shared file)
            assert report["path"].endswith(".html") and "/fraud/fraud__" in report["path"], report
            assert "None" not in report["path"].rsplit("/", 1)[-1], report
        after = stack.route()
        assert after == before, f"{title}: the route changed: {before} -> {after}"
