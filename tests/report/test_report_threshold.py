"""The metric plot draws the rollback threshold in the units of what it draws, where the judge's rule puts it.

The judge rolls back when ``z_harm = t_to_z(sign * diff / se, df) >= b_rollback``; the plot shows the
difference (a dot) with the promotion interval (bars). The red line is the difference at which that rule
fires: ``sign * b_rollback * se`` on infinite degrees of freedom, further out on few.
"""

from __future__ import annotations

import math

import pytest
from canary.analysis.stats import t_to_z
from canary.report import (
    ESTIMATE_LABEL,
    MARGIN_LABEL,
    ROLLBACK_LABEL,
    build_run,
    metric_figure,
    metric_points,
    render_report,
    rollback_threshold,
)


def record(**changes):
    """One metric's evidence as ``MetricEvidence.to_dict()`` writes it (an infinite df is stored as null)."""
    ev = {"name": "error_rate", "kind": "binary", "direction": "decrease", "critical": True, "tested": True,
          "stable": 0.02, "canary": 0.027, "diff": 0.007, "se": 0.004, "df": None, "z_harm": 1.75,
          "b_rollback": 2.5, "z_ni": 0.75, "b_promotion": 1.5, "margin": 0.01, "harm": False,
          "non_inferior": False}
    ev.update(changes)
    ev["interval"] = [ev["diff"] - 1.5 * 0.004, ev["diff"] + 1.5 * 0.004]  # the judge's: diff ± b_promotion * se
    return ev


def run_of(*evs):
    steps = [{"percent": 5, "step_started_at": "2026-11-27T10:00:00+00:00"}]
    analyses = [{"looks": [{"look_at": "2026-11-27T10:10:00+00:00",
                            "verdict": {"decision": "extend", "reason": "inconclusive", "metrics": list(evs)}}]}]
    return build_run({"spec": {"model": "fraud"}, "candidate": "v2", "run_id": "r1"}, {"stable": "v1"},
                     steps=steps, analyses=analyses, outcome="running", reason="holding")


def drawn(fig, label):
    """The y values of the line labelled ``label`` (the dots, for the error bar container's label)."""
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.get_label() == label]
    if bars:
        return [float(y) for y in bars[0].lines[0].get_ydata()]
    lines = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(lines) == 1, [ln.get_label() for ln in fig.axes[0].get_lines()]
    return [float(y) for y in lines[0].get_ydata()]


@pytest.mark.parametrize(("direction", "sign"), [("decrease", 1.0), ("increase", -1.0)])
def test_drawn_threshold_is_boundary_times_se_on_the_harm_side(direction, sign):
    ev = record(direction=direction, diff=sign * 0.007)
    assert rollback_threshold(ev) == pytest.approx(sign * 2.5 * 0.004)  # 0.01 on the harm side
    points = metric_points(run_of(ev))["error_rate"]
    fig = metric_figure("error_rate", points)
    assert drawn(fig, ROLLBACK_LABEL) == pytest.approx([sign * 0.01])
    assert drawn(fig, MARGIN_LABEL) == pytest.approx([sign * 0.01])
    # the dot is the difference, and the bar around it reaches past the threshold without a rollback
    (dot,) = drawn(fig, ESTIMATE_LABEL)
    assert dot == pytest.approx(sign * 0.007)
    far_end = points[0].high if sign > 0 else points[0].low
    assert sign * far_end > sign * points[0].rollback_bound > sign * dot


def test_threshold_with_few_degrees_of_freedom_is_where_z_harm_reaches_the_boundary():
    ev = record(df=4.0)
    threshold = rollback_threshold(ev)
    assert threshold > 2.5 * 0.004, "on 4 degrees of freedom the t value of z = 2.5 is larger than 2.5"
    assert t_to_z(threshold / 0.004, 4.0) == pytest.approx(2.5, abs=1e-9)
    # the judge's rule on each side of the drawn line: just past it is harm, just short of it is not
    assert t_to_z(threshold * 1.001 / 0.004, 4.0) >= 2.5 > t_to_z(threshold * 0.999 / 0.004, 4.0)
    fig = metric_figure("error_rate", metric_points(run_of(ev))["error_rate"])
    assert drawn(fig, ROLLBACK_LABEL) == pytest.approx([threshold])
    # increase metrics: the mirror image
    assert rollback_threshold(record(df=4.0, direction="increase")) == pytest.approx(-threshold)


def test_no_threshold_without_a_finite_boundary_or_an_se():
    assert rollback_threshold(record(b_rollback=None)) is None  # infinite boundary, stored as null
    assert rollback_threshold(record(se=None, tested=False)) is None
    fig = metric_figure("error_rate", metric_points(run_of(record(b_rollback=None)))["error_rate"])
    assert ROLLBACK_LABEL not in [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert not math.isnan(drawn(fig, MARGIN_LABEL)[0])


def test_the_report_says_what_the_threshold_is_compared_with():
    html = render_report(run_of(record()))
    assert "compares the dot itself with the red rollback threshold" in html
    assert "A bar may cross the red line without a rollback" in html
    assert "rollback threshold" in html and "rollback boundary" not in html
    assert "<img alt='error_rate at every look' src='data:image/png;base64," in html  # still self-contained
