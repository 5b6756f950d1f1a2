"""Cross-field problems that quote a default say so, and name the misspelled key that left the field unset.

Without this, ``hold: {min_duraton: 1m, max_wait: 30s}`` gives, after the unknown-key problem, "the maximum
wait is shorter than hold.min_duration (10m)": the 10m is the default of the key the user misspelled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from canary.spec import Problem, SpecError, load_spec


def problems(tmp_path: Path, text: str, params: dict | None = None) -> dict[str, Problem]:
    """The problems of a spec file ``demo.yaml`` holding ``text``, by field path (each path once)."""
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path, params)
    out = {p.path: p for p in info.value.problems}
    assert len(out) == len(info.value.problems), info.value
    return out


METRICS = "metrics:\n  - {name: error_rate, source: error, kind: binary, critical: true, margin: 0.01}\n"


def test_misspelled_min_duration_is_named_in_the_follow_on_problem(tmp_path: Path) -> None:
    """The user's trial, as written: the follow-on says the 10m is a default, and why."""
    text = "model: demo\nsteps: [5, 25]\nhold:\n  min_duraton: 1m\n  max_wait: 30s\n" + METRICS
    found = problems(tmp_path, text)
    assert set(found) == {"hold.min_duraton", "hold.max_wait"}
    assert "did you mean 'min_duration'?" in found["hold.min_duraton"].fix
    follow_on = found["hold.max_wait"]
    assert follow_on.message == (
        "the maximum wait is shorter than hold.min_duration (10m); hold.min_duration is not set "
        "(the unknown key 'min_duraton' was ignored), so its default 10m applies"
    )
    # The fix is the rename, not "make max_wait at least 10m" (a number the user never meant).
    assert follow_on.fix.startswith("rename 'min_duraton' to 'min_duration'")
    assert "10m" not in follow_on.fix and "40m" not in follow_on.fix


def test_with_the_key_spelled_right_the_problem_quotes_the_users_value(tmp_path: Path) -> None:
    text = "model: demo\nsteps: [5, 25]\nhold:\n  min_duration: 1m\n  max_wait: 30s\n" + METRICS
    found = problems(tmp_path, text)
    assert set(found) == {"hold.max_wait"}
    assert found["hold.max_wait"].message == "the maximum wait is shorter than hold.min_duration (1m)"
    assert found["hold.max_wait"].fix == "make max_wait at least 1m, e.g. 4m"


def test_omitted_max_wait_says_its_default_applies(tmp_path: Path) -> None:
    found = problems(tmp_path, "model: demo\nhold: {min_duration: 3h}\n" + METRICS)
    assert set(found) == {"hold.max_wait"}
    p = found["hold.max_wait"]
    assert p.message == (
        "the maximum wait is shorter than hold.min_duration (3h); hold.max_wait is not set, so its default 2h applies"
    )
    assert "unknown" not in p.message and p.fix == "make max_wait at least 3h, e.g. 12h"


def test_a_misspelled_section_is_named_for_the_field_it_leaves_unset(tmp_path: Path) -> None:
    found = problems(tmp_path, "model: demo\nhodl: {poll_interval: 10s}\nlease: 40s\n" + METRICS)
    assert set(found) == {"hodl", "lease"}
    p = found["lease"]
    assert p.message.endswith(
        "; hold.poll_interval is not set (the unknown key 'hodl' was ignored), so its default 30s applies"
    )
    assert p.fix.startswith("rename 'hodl' to 'hold'")


def test_deadline_names_every_defaulted_input_and_only_those(tmp_path: Path) -> None:
    text = "model: demo\nstep: [1, 2]\nhold: {min_duration: 10m}\ndeadline: 30m\n" + METRICS
    found = problems(tmp_path, text)
    assert set(found) == {"step", "deadline"}
    message = found["deadline"].message
    assert "(4 steps x 10m hold + 10m post-deploy window)" in message
    assert "steps is not set (the unknown key 'step' was ignored), so its default [1, 5, 25, 50] applies" in message
    assert "post_deploy.window is not set, so its default 10m applies" in message
    assert "hold.min_duration" not in message.split(";", 1)[1], "hold.min_duration is set: no note for it"
    assert found["deadline"].fix.startswith("rename 'step' to 'steps'")


def test_trigger_param_typo_is_named_in_the_follow_on_problem(tmp_path: Path) -> None:
    text = "model: demo\nhold: {min_duration: 20m, max_wait: 1h}\n" + METRICS
    found = problems(tmp_path, text, {"hold_max_wait": "5m", "hold_min_duraton": "1m"})
    assert set(found) == {"params.hold_min_duraton", "params.hold_max_wait"}
    p = found["params.hold_max_wait"]
    assert p.message == (
        "the maximum wait is shorter than the minimum duration (20m); hold_min_duration is not given "
        "(the unknown trigger param 'hold_min_duraton' was ignored), so the spec's hold.min_duration 20m applies"
    )
    assert p.fix.startswith("rename 'hold_min_duraton' to 'hold_min_duration'")


def test_trigger_param_not_given_falls_back_to_the_specs_default(tmp_path: Path) -> None:
    found = problems(tmp_path, "model: demo\n" + METRICS, {"hold_min_duration": "3h"})
    p = found["params.hold_max_wait"]
    assert p.message.endswith("; hold_max_wait is not given, so the default hold.max_wait 2h applies")
    assert p.fix == "raise hold_max_wait or lower hold_min_duration"


def test_margin_override_of_default_metrics_says_the_metrics_are_defaults(tmp_path: Path) -> None:
    found = problems(tmp_path, "model: demo\nmetric:\n  - {name: eror}\n", {"margins": {"eror": 0.1}})
    p = found["params.margins.eror"]
    assert "metrics is not set (the unknown key 'metric' was ignored), so its default" in p.message
    assert "error_rate, latency_p95_exceed" in p.message
    assert p.fix.startswith("rename 'metric' to 'metrics'")


def test_required_metric_field_under_a_misspelled_key(tmp_path: Path) -> None:
    text = (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margn: 0.01}\n"
        "  - {name: l, source: latency_ms, kind: latency_threshold, thresold: 200, margin: 0.01}\n"
    )
    found = problems(tmp_path, text)
    assert found["metrics[0].margin"].message == "the metric's margin is required (the unknown key 'margn' was ignored)"
    assert found["metrics[0].margin"].fix == "rename 'margn' to 'margin'"
    assert found["metrics[1].threshold"].fix == "rename 'thresold' to 'threshold'"
    # omitted, not misspelled: the plain message and the example
    found = problems(tmp_path, "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary}\n")
    assert found["metrics[0].margin"].message == "the metric's margin is required"
    assert found["metrics[0].margin"].fix == "add margin: 0.002"
