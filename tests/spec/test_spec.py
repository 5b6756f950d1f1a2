"""canary.spec: loading, defaults, trigger-param merging, and one specific message per malformed input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from canary.spec import (
    DEFAULTS,
    RolloutSpec,
    SpecError,
    format_duration,
    load_spec,
    parse_duration,
    spec_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
ROLLOUTS = REPO / "include" / "rollouts"

VALID = """\
model: demo
steps: [1, 5, 25, 50]
hold: {min_duration: 10m, min_samples: 500, max_wait: 2h, poll_interval: 30s}
metrics:
  - {name: error_rate, source: error, kind: binary, margin: 0.002, critical: true}
  - {name: latency_p95_exceed, source: latency_ms, kind: latency_threshold, threshold: baseline_p95, margin: 0.02}
  - {name: mistake_rate, source: mismatch, kind: binary, margin: 0.1, margin_type: relative, label_delay: 1m}
"""


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(exc: SpecError) -> list[tuple[str, str, str]]:
    return [(p.file, p.path, p.message) for p in exc.problems]


# ------------------------------------------------------------------------------------------- valid specs


@pytest.mark.parametrize("name", ["fraud", "eta"])
def test_shipped_specs_load_and_round_trip(name: str) -> None:
    spec = load_spec(ROLLOUTS / f"{name}.yaml")
    assert spec.model == name
    assert spec.dag_id == f"canary_rollout__{name}"
    assert spec_from_dict(spec.to_dict()) == spec
    policy = spec.policy()
    assert [m.name for m in policy.metrics] == [m.name for m in spec.metrics]
    assert policy.planned_looks == len(spec.steps)
    assert policy.expected_canary_share == tuple(p / 100 for p in spec.steps)
    assert policy.alpha_rollback == spec.alpha.rollback


def test_fraud_spec_values_are_parsed() -> None:
    spec = load_spec(ROLLOUTS / "fraud.yaml")
    assert spec.steps == (1, 5, 25, 50)
    assert (spec.hold.min_duration, spec.hold.max_wait, spec.hold.poll_interval) == (600, 7200, 30)
    assert spec.lease == 900 and spec.deadline == 86400
    mistake = spec.metric("mistake_rate")
    assert mistake.label_delay == 60 and mistake.needs_labels and mistake.margin_type == "relative"
    assert spec.metric("latency_p95_exceed").threshold == "baseline_p95"
    assert spec.schedule is None and spec.on_inconclusive == "rollback"


def test_minimal_spec_gets_documented_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "model: demo\n"))
    assert spec.steps == tuple(DEFAULTS["steps"])
    assert spec.hold.min_samples == DEFAULTS["hold"]["min_samples"]
    assert spec.connections.router == "canary_gateway"
    assert [m.name for m in spec.metrics] == ["error_rate", "latency_p95_exceed"]
    assert spec.alpha.rollback == 0.05 and spec.srm.alpha == 0.001
    assert spec.data_quality.suite is None and spec.drift.features == "all"
    assert spec.post_deploy.window == 600 and spec.notifications.email == ()


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    with pytest.raises(AttributeError):
        spec.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30), ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), ("45", 45)],
)
def test_parse_duration(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10 minutes", "1w", True, -5.5, "", None, "1.0001s"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="30s"):
        parse_duration(bad)


def test_format_duration_is_exact() -> None:
    assert [format_duration(s) for s in (0, 45, 600, 5400, 7200, 86400)] == ["0s", "45s", "10m", "90m", "2h", "1d"]


# ------------------------------------------------------------------------------------------ trigger params


def test_params_override_steps_holds_and_margins(tmp_path: Path) -> None:
    params = {
        "candidate": "v2",
        "steps": [2, 50],
        "hold_min_duration": "5m",
        "hold_min_samples": 200,
        "hold_max_wait": "1h",
        "margins": {"error_rate": 0.005},
    }
    spec = load_spec(write(tmp_path, VALID), params, require_candidate=True)
    assert spec.candidate == "v2"
    assert spec.steps == (2, 50)
    assert (spec.hold.min_duration, spec.hold.min_samples, spec.hold.max_wait) == (300, 200, 3600)
    assert spec.metric("error_rate").margin == 0.005
    assert spec.metric("mistake_rate").margin == 0.1
    assert dict(spec.overrides) == {
        "steps": [2, 50],
        "hold_min_duration": 300,
        "hold_min_samples": 200,
        "hold_max_wait": 3600,
        "margins": {"error_rate": 0.005},
    }


def test_unchanged_form_changes_nothing(tmp_path: Path) -> None:
    base = load_spec(write(tmp_path, VALID))
    merged = load_spec(write(tmp_path, VALID), {**base.param_defaults(), "candidate": "v7"}, require_candidate=True)
    assert dict(merged.overrides) == {}
    assert merged.to_dict() == base.to_dict()


def test_scheduled_run_may_omit_candidate(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID + "schedule: '0 2 * * *'\n"), {"candidate": None})
    assert spec.candidate is None and spec.schedule == "0 2 * * *"


# --------------------------------------------------------------------------------- malformed specs/confs
# Each case: spec text (or None for VALID), trigger params, require_candidate, expected
# (file suffix, field path, message fragment).

CASES = {
    "wrong-type-min-samples": (
        "model: demo\nhold: {min_samples: many}\n", None, False,
        ("demo.yaml", "hold.min_samples", "must be a whole number"),
    ),
    "wrong-type-steps-string": (
        "model: demo\nsteps: '1, 5, 25'\n", None, False,
        ("demo.yaml", "steps", "must be a non-empty list of percents"),
    ),
    "steps-not-increasing": (
        "model: demo\nsteps: [1, 25, 5]\n", None, False,
        ("demo.yaml", "steps[2]", "strictly increasing: 5 does not exceed the previous step 25"),
    ),
    "step-zero": (
        "model: demo\nsteps: [0, 50]\n", None, False,
        ("demo.yaml", "steps[0]", "must be > 0 and <= 100"),
    ),
    "step-above-100": (
        "model: demo\nsteps: [50, 150]\n", None, False,
        ("demo.yaml", "steps[1]", "must be > 0 and <= 100"),
    ),
    "step-too-fine": (
        "model: demo\nsteps: [0.001, 50]\n", None, False,
        ("demo.yaml", "steps[0]", "steps of 0.01 %"),
    ),
    "negative-margin": (
        "model: demo\nmetrics:\n  - {name: error_rate, source: error, kind: binary, margin: -0.01}\n", None, False,
        ("demo.yaml", "metrics[0].margin", "out of range: must be >= 0"),
    ),
    "unknown-metric-kind": (
        "model: demo\nmetrics:\n  - {name: error_rate, source: error, kind: binomial, margin: 0.01}\n", None, False,
        ("demo.yaml", "metrics[0].kind", "unknown metric kind"),
    ),
    "unknown-metric-source": (
        "model: demo\nmetrics:\n  - {name: error_rate, source: errors, kind: binary, margin: 0.01}\n", None, False,
        ("demo.yaml", "metrics[0].source", "unknown metric source"),
    ),
    "typo-top-level-key": (
        "model: demo\nhodl: {min_duration: 10m}\n", None, False,
        ("demo.yaml", "hodl", "unknown key 'hodl' in the spec"),
    ),
    "typo-nested-key": (
        "model: demo\nhold: {min_sample: 10}\n", None, False,
        ("demo.yaml", "hold.min_sample", "unknown key 'min_sample' in hold"),
    ),
    "typo-metric-key": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 0.01, critcal: true}\n", None, False,
        ("demo.yaml", "metrics[0].critcal", "unknown key 'critcal'"),
    ),
    "missing-candidate-manual-run": (
        None, {"candidate": None}, True,
        ("demo.yaml (trigger params)", "params.candidate", "must name the candidate version"),
    ),
    "empty-candidate-manual-run": (
        None, {"candidate": "  "}, True,
        ("demo.yaml (trigger params)", "params.candidate", "must name the candidate version"),
    ),
    "empty-file": ("", None, False, ("demo.yaml", "", "the spec file is empty")),
    "comments-only-file": ("# nothing yet\n", None, False, ("demo.yaml", "", "the spec file is empty")),
    "yaml-syntax-error": (
        "model: demo\nsteps: [1, 5\nhold: {}\n", None, False,
        ("demo.yaml", "", "YAML syntax error at line"),
    ),
    "yaml-duplicate-key": (
        "model: demo\nsteps: [1, 5]\nsteps: [1, 50]\n", None, False,
        ("demo.yaml", "", "duplicate key 'steps'"),
    ),
    "top-level-list": ("- model: demo\n", None, False, ("demo.yaml", "", "must be a mapping of fields, not a list")),
    "bad-duration": (
        "model: demo\nhold: {min_duration: 10 minutes}\n", None, False,
        ("demo.yaml", "hold.min_duration", "is not a duration"),
    ),
    "cluster-width-not-dividing-an-hour": (
        "model: demo\nclusters: {width: 7s}\n", None, False,
        ("demo.yaml", "clusters.width", "must divide one hour"),
    ),
    "cluster-width-zero": (
        "model: demo\nclusters: {width: 0}\n", None, False,
        ("demo.yaml", "clusters.width", "too short: must be at least 1 seconds"),
    ),
    "cluster-width-not-a-duration": (
        "model: demo\nclusters: {width: ten seconds}\n", None, False,
        ("demo.yaml", "clusters.width", "is not a duration"),
    ),
    "cluster-min-per-arm-one": (
        "model: demo\nclusters: {min_per_arm: 1}\n", None, False,
        ("demo.yaml", "clusters.min_per_arm", "out of range: must be >= 2"),
    ),
    "clusters-typo-nested-key": (
        "model: demo\nclusters: {widht: 10s}\n", None, False,
        ("demo.yaml", "clusters.widht", "unknown key 'widht' in clusters"),
    ),
    "clusters-not-a-mapping": (
        "model: demo\nclusters: 10s\n", None, False,
        ("demo.yaml", "clusters", "must be a mapping"),
    ),
    "alpha-out-of-range": (
        "model: demo\nalpha: {rollback: 0.7}\n", None, False,
        ("demo.yaml", "alpha.rollback", "out of range: must be > 0 and < 0.5"),
    ),
    "on-inconclusive-unknown": (
        "model: demo\non_inconclusive: wait\n", None, False,
        ("demo.yaml", "on_inconclusive", "unknown on_inconclusive action"),
    ),
    "latency-threshold-missing": (
        "model: demo\nmetrics:\n  - {name: slow, source: latency_ms, kind: latency_threshold, margin: 0.02}\n",
        None, False,
        ("demo.yaml", "metrics[0].threshold", "needs a threshold"),
    ),
    "threshold-on-binary-metric": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 0.01, threshold: 250}\n",
        None, False,
        ("demo.yaml", "metrics[0].threshold", "only applies to kind latency_threshold"),
    ),
    "source-does-not-fit-kind": (
        "model: demo\nmetrics:\n  - {name: lat, source: latency_ms, kind: binary, margin: 0.01}\n", None, False,
        ("demo.yaml", "metrics[0].source", "does not fit kind 'binary'"),
    ),
    "label-delay-on-non-label-metric": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 0.01, label_delay: 5m}\n",
        None, False,
        ("demo.yaml", "metrics[0].label_delay", "only applies to label metrics"),
    ),
    "duplicate-metric-name": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 0.01}\n"
        "  - {name: e, source: null_score, kind: binary, margin: 0.01}\n",
        None, False,
        ("demo.yaml", "metrics[1].name", "duplicate metric name"),
    ),
    "metric-missing-margin": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary}\n", None, False,
        ("demo.yaml", "metrics[0].margin", "the metric's margin is required"),
    ),
    "metric-name-not-identifier": (
        "model: demo\nmetrics:\n  - {name: Error Rate, source: error, kind: binary, margin: 0.01}\n", None, False,
        ("demo.yaml", "metrics[0].name", "is not a valid metric name"),
    ),
    "relative-margin-not-a-fraction": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 25, margin_type: relative}\n",
        None, False,
        ("demo.yaml", "metrics[0].margin", "fraction of stable's value"),
    ),
    "model-differs-from-file": (
        "model: fraud\n", None, False, ("demo.yaml", "model", "differs from the file name 'demo'"),
    ),
    "model-name-unsafe": ("model: ../etc\n", None, False, ("demo.yaml", "model", "is not a valid model name")),
    "model-missing": ("steps: [1, 50]\n", None, False, ("demo.yaml", "model", "the model name is required")),
    "max-wait-below-min-duration": (
        "model: demo\nhold: {min_duration: 1h, max_wait: 10m}\n", None, False,
        ("demo.yaml", "hold.max_wait", "shorter than hold.min_duration"),
    ),
    "lease-shorter-than-two-polls": (
        "model: demo\nlease: 40s\nhold: {poll_interval: 30s}\n", None, False,
        ("demo.yaml", "lease", "must outlive two polls"),
    ),
    "deadline-too-short": (
        "model: demo\ndeadline: 30m\n", None, False,
        ("demo.yaml", "deadline", "shorter than the least time the rollout needs"),
    ),
    "schedule-bad-cron": (
        "model: demo\nschedule: '61 2 * * *'\n", None, False,
        ("demo.yaml", "schedule", "is not a valid cron expression"),
    ),
    "schedule-bad-preset": (
        "model: demo\nschedule: '@nighty'\n", None, False,
        ("demo.yaml", "schedule", "is not a schedule preset"),
    ),
    "bool-for-critical": (
        "model: demo\nmetrics:\n  - {name: e, source: error, kind: binary, margin: 0.01, critical: 'yes'}\n",
        None, False,
        ("demo.yaml", "metrics[0].critical", "must be true or false"),
    ),
    "bad-email": (
        "model: demo\nnotifications: {email: [ops-at-example]}\n", None, False,
        ("demo.yaml", "notifications.email[0]", "is not a valid e-mail address"),
    ),
    "drift-feature-name-unsafe": (
        "model: demo\ndrift: {features: [amount, \"x'); drop table predictions; --\"]}\n",
        None,
        False,
        ("demo.yaml", "drift.features[1]", "is not a valid feature name"),
    ),
    "conf-unknown-param": (
        None, {"candiate": "v2"}, False,
        ("demo.yaml (trigger params)", "params.candiate", "unknown trigger param 'candiate'"),
    ),
    "conf-candidate-unsafe": (
        None, {"candidate": "../v2"}, True,
        ("demo.yaml (trigger params)", "params.candidate", "is not a valid model version"),
    ),
    "conf-steps-not-increasing": (
        None, {"candidate": "v2", "steps": [10, 5]}, True,
        ("demo.yaml (trigger params)", "params.steps[1]", "strictly increasing"),
    ),
    "conf-more-steps-than-dag": (
        None, {"candidate": "v2", "steps": [1, 2, 3, 4, 5]}, True,
        ("demo.yaml (trigger params)", "params.steps", "an override may have fewer, not more"),
    ),
    "conf-margin-unknown-metric": (
        None, {"candidate": "v2", "margins": {"eror_rate": 0.01}}, True,
        ("demo.yaml (trigger params)", "params.margins.eror_rate", "no metric 'eror_rate' in the spec"),
    ),
    "conf-negative-margin": (
        None, {"candidate": "v2", "margins": {"error_rate": -1}}, True,
        ("demo.yaml (trigger params)", "params.margins.error_rate", "out of range: must be >= 0"),
    ),
    "conf-min-samples-zero": (
        None, {"candidate": "v2", "hold_min_samples": 0}, True,
        ("demo.yaml (trigger params)", "params.hold_min_samples", "out of range: must be >= 1"),
    ),
    "conf-bad-duration": (
        None, {"candidate": "v2", "hold_max_wait": "soon"}, True,
        ("demo.yaml (trigger params)", "params.hold_max_wait", "is not a duration"),
    ),
    "conf-max-wait-below-min-duration": (
        None, {"candidate": "v2", "hold_min_duration": "3h"}, True,
        ("demo.yaml (trigger params)", "params.hold_max_wait", "shorter than the minimum duration"),
    ),
    "conf-not-an-object": (
        None, ["v2"], False,
        ("demo.yaml (trigger params)", "params", "must be a JSON object"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_malformed_input_names_file_field_and_fix(tmp_path: Path, case: str) -> None:
    text, params, require_candidate, (file, path, fragment) = CASES[case]
    spec_file = write(tmp_path, VALID if text is None else text)
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, params, require_candidate=require_candidate)
    matching = [p for p in info.value.problems if p.file == file and p.path == path and fragment in p.message]
    assert matching, f"expected ({file}, {path}, ...{fragment}...) in {problems_of(info.value)}"
    problem = matching[0]
    assert problem.fix, "every problem says how to fix it"
    rendered = str(info.value)
    assert file in rendered and fragment in rendered and "Fix:" in rendered


def test_did_you_mean_suggestions(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "model: demo\nhodl: {}\nalpah: {rollback: 0.05}\n"), {"candiate": "v2"})
    fixes = {p.path: p.fix for p in info.value.problems}
    assert "did you mean 'hold'" in fixes["hodl"]
    assert "did you mean 'alpha'" in fixes["alpah"]
    assert "did you mean 'candidate'" in fixes["params.candiate"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
    model: demo
    steps: [5, 1, 200]
    hold: {min_samples: -1, max_wait: forever}
    alpha: {rollback: 2}
    metrics:
      - {name: e, source: error, kind: binomial, margin: -1}
    on_inconclusive: shrug
    colour: blue
    """
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), {"steps": "all"})
    paths = {p.path for p in info.value.problems}
    assert {"steps[1]", "steps[2]", "hold.min_samples", "hold.max_wait", "alpha.rollback", "metrics[0].kind",
            "metrics[0].margin", "on_inconclusive", "colour", "params.steps"} <= paths
    assert str(info.value).startswith(f"{len(info.value.problems)} problems in the rollout spec")


def test_bad_value_is_shown_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "model: demo\nsteps: [1, 25, 5]\n"))
    assert "(got 5)" in str(info.value)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_from_dict_validates(tmp_path: Path) -> None:
    data = load_spec(write(tmp_path, VALID)).to_dict()
    data["steps"] = [50, 5]
    with pytest.raises(SpecError, match=r"<plan>: steps\[1\]"):
        spec_from_dict(data)


def test_policy_rejects_nothing_the_spec_accepts(tmp_path: Path) -> None:
    """Edges of the spec's ranges are accepted by the judge's Policy too (same bounds on both sides)."""
    text = VALID + "alpha: {rollback: 0.4999, promotion: 0.0001}\nsrm: {alpha: 0.3}\n"
    spec: RolloutSpec = load_spec(write(tmp_path, text))
    policy = spec.policy(planned_canary_samples=1000)
    assert policy.alpha_rollback == 0.4999 and policy.planned_canary_samples == 1000


def test_cluster_width_is_parsed_and_reaches_the_policy(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID + "clusters: {width: 10s, min_per_arm: 4}\n"))
    assert (spec.clusters.width, spec.clusters.min_per_arm) == (10, 4)
    assert spec.to_dict()["clusters"] == {"width": 10, "min_per_arm": 4}
    assert spec_from_dict(spec.to_dict()) == spec
    policy = spec.policy(planned_canary_samples=1000)
    assert (policy.cluster_seconds, policy.min_clusters) == (10, 4)
    assert load_spec(write(tmp_path, VALID + "clusters: {width: 5m}\n")).policy().cluster_seconds == 300


def test_specs_without_clusters_keep_one_minute(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert (spec.clusters.width, spec.clusters.min_per_arm) == (60, 3) == tuple(DEFAULTS["clusters"].values())
    policy = spec.policy()
    assert (policy.cluster_seconds, policy.min_clusters) == (60, 3)
    old_plan = spec.to_dict()
    del old_plan["clusters"]  # a plan written before the field existed (a run in flight)
    assert spec_from_dict(old_plan) == spec


def test_clusters_typo_suggests_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "model: demo\nclustres: {width: 10s}\nclusters: {min_per_am: 3}\n"))
    fixes = {p.path: p.fix for p in info.value.problems}
    assert "did you mean 'clusters'" in fixes["clustres"]
    assert "did you mean 'min_per_arm'" in fixes["clusters.min_per_am"]


def test_every_width_the_spec_accepts_the_policy_accepts(tmp_path: Path) -> None:
    for width in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        spec = load_spec(write(tmp_path, VALID + f"clusters: {{width: {width}}}\n"))
        assert spec.policy().cluster_seconds == width
    with pytest.raises(SpecError, match=r"demo.yaml: clusters.width: a cluster width must divide one hour .*Fix"):
        load_spec(write(tmp_path, VALID + "clusters: {width: 2h}\n"))
