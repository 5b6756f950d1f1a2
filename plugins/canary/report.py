"""The HTML report of one rollout run: one self-contained file, plots embedded as base64 PNG.

``write_report(run, out_dir)`` is called by ``canary.runtime.report`` (trigger rule ``all_done``), so it
must render whatever part of a run exists: a run that failed in pre-flight has no steps, a rolled-back run
has no drift table. The input is one JSON dict, built from the run's XComs (see :func:`build_run`):

.. code-block:: text

    run = {
      "model": str, "stable": str, "candidate": str, "run_id": str, "dag_id"?: str,
      "outcome": "promoted" | "rolled_back" | "paused" | "failed" | "skipped" | "running",
      "reason": str,                                   # why the run ended as it did
      "started_at"?: ISO time (pre-flight's rollout_started_at), "finished_at"?: ISO time,
      "final_percent"?: number,                        # canary share at the end (0 rolled back, 100 promoted)
      "steps": [                                       # one per set_traffic that ran, in order
        {"step_index": int, "percent": number, "step_started_at": ISO,
         "looks": [{"look_at": ISO, "verdict": Verdict.to_dict(), "record": text}]}
      ],
      "root_cause"?: dict | str,                       # rollback: failing metrics, data quality, drift, segments
      "drift"?: dict,                                  # drift_check's result after promotion
      "power_plan"?: dict, "notifications"?: list, "spec"?: dict, "decision_records"?: [text],
      "power_warnings"?: [{"metric", "problem", "message", ...}],  # pre-flight: a metric the plan cannot power
    }

Verdict dicts are taken as the judge writes them (``canary.analysis.Verdict.to_dict()``): the per-metric
evidence is read by name with a few fallbacks, and anything missing is shown as "–" rather than failing.
Every string is HTML-escaped; nothing in a run dict can inject markup or script into the report.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

__all__ = [
    "write_report",
    "render_report",
    "build_run",
    "report_filename",
    "ReportError",
    "metric_points",
    "metric_figure",
    "rollback_threshold",
]

OUTCOMES = ("promoted", "rolled_back", "paused", "failed", "skipped", "running")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(ValueError):
    """The run dict cannot be rendered (the message names the field and the fix)."""


# --------------------------------------------------------------------------------------------------------
# small helpers


def _e(value: Any) -> str:
    """HTML-escape anything (None becomes an en dash)."""
    if value is None:
        return "&ndash;"
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell, escaped; non-numbers are shown as text."""
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return _e(value)
    if isinstance(value, int | float):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return _e(value)
        if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
            return _e(f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}")
        return _e(f"{value:.{digits}g}")
    return _e(value)


def _float(value: Any) -> float | None:
    try:
        if value is None or isinstance(value, bool):
            return None
        out = float(value)
        return None if math.isnan(out) else out
    except (TypeError, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    """Parse an ISO-8601 time (``Z`` or offset or naive UTC) into an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _first(mapping: Mapping[str, Any] | None, *keys: str) -> Any:
    """The first present, non-None value among ``keys``."""
    if not mapping:
        return None
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def report_filename(run: Mapping[str, Any]) -> str:
    """``<model>__<run id>.html`` with anything unsafe for a file name replaced by ``_``."""
    model = _SAFE_NAME.sub("_", str(run.get("model") or "model")).strip("._") or "model"
    run_id = _SAFE_NAME.sub("_", str(run.get("run_id") or "run")).strip("._") or "run"
    return f"{model}__{run_id}"[:200] + ".html"


# --------------------------------------------------------------------------------------------------------
# reading the verdict dicts


@dataclass(frozen=True)
class MetricPoint:
    """One metric at one look, as plotted.

    :param label: the look's label on the x axis (``s2·l1 5%``).
    :param difference: canary minus stable estimate (metric units).
    :param low: lower end of the judge's interval of the difference (``diff - t * se``, ``t`` the t value of
        ``b_promotion`` on the look's ``df``).
    :param high: upper end.
    :param rollback_bound: the rollback threshold in metric units: the difference at which the harm statistic
        ``z_harm`` reaches its boundary ``b_rollback`` at this look (harm side: above 0 for ``decrease``
        metrics, below 0 for ``increase``). The run rolls back when the difference itself passes it; the
        interval is not compared with it.
    :param noninferiority_bound: the difference the interval must stay below (decrease) / above (increase)
        to show non-inferiority: the margin in metric units.
    :param status: the metric's own status at this look (e.g. ``harm``, ``non_inferior``, ``inconclusive``).
    """

    label: str
    difference: float | None
    low: float | None
    high: float | None
    rollback_bound: float | None
    noninferiority_bound: float | None
    status: str | None


def _metrics_of(verdict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The verdict's per-metric evidence as a list of dicts with a ``name``."""
    metrics = verdict.get("metrics") or []
    if isinstance(metrics, Mapping):
        return [{"name": name, **(ev or {})} for name, ev in metrics.items()]
    return [m for m in metrics if isinstance(m, Mapping)]


def _interval(ev: Mapping[str, Any]) -> tuple[float | None, float | None]:
    ci = _first(ev, "interval", "ci", "confidence_interval")
    if isinstance(ci, Mapping):
        return _float(_first(ci, "low", "lower", "lo")), _float(_first(ci, "high", "upper", "hi"))
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        return _float(ci[0]), _float(ci[1])
    return _float(_first(ev, "ci_low", "interval_low", "lower")), _float(_first(ev, "ci_high", "interval_high", "upper"))


def _status(ev: Mapping[str, Any]) -> str | None:
    explicit = _first(ev, "status", "result")
    if explicit is not None:
        return str(explicit)
    if "tested" not in ev and "harm" not in ev:
        return None
    if (ev.get("breaker") or {}).get("tripped"):
        return "circuit breaker"
    if ev.get("harm"):
        return "harm"
    if ev.get("non_inferior"):
        return "non-inferior"
    return "inconclusive" if ev.get("tested") else "not tested"


def _z_to_t(z: float, df: float | None) -> float:
    """:func:`canary.analysis.stats.z_to_t`, imported lazily (like matplotlib: only a report with finite
    ``df`` needs scipy)."""
    if df is None or not math.isfinite(df) or df > 1e6 or not math.isfinite(z):
        return z
    from canary.analysis.stats import z_to_t

    return z_to_t(z, df)


def rollback_threshold(ev: Mapping[str, Any]) -> float | None:
    """The rollback threshold of one metric at one look, in the metric's units (canary - stable).

    The judge rolls back when ``z_harm = t_to_z(sign * diff / se, df)`` reaches ``b_rollback`` (``sign`` +1
    when lower is better): that is when ``sign * diff`` reaches ``se * t``, with ``t`` the t value of
    ``b_rollback`` on ``df`` degrees of freedom. So the threshold is ``sign * b_rollback * se`` when ``df`` is
    infinite, and further out when few clusters give few degrees of freedom. ``None`` when the metric was
    not tested or its boundary is infinite (no rollback possible at this look).
    """
    explicit = _float(_first(ev, "rollback_boundary_diff", "rollback_bound"))
    if explicit is not None:
        return explicit
    se, b_rb = _float(ev.get("se")), _float(ev.get("b_rollback"))
    if se is None or b_rb is None or not math.isfinite(b_rb):
        return None
    sign = -1.0 if ev.get("direction") == "increase" else 1.0
    return sign * _z_to_t(b_rb, _float(ev.get("df"))) * se


def _point(label: str, ev: Mapping[str, Any]) -> MetricPoint:
    """Read one metric's evidence as the judge writes it (``MetricEvidence.to_dict()``).

    The judge's boundaries are on the z scale; the plot shows everything in metric units: the rollback
    threshold (:func:`rollback_threshold`), the non-inferiority margin ``sign * margin``, and the judge's
    interval ``diff ± t * se`` (``t``: the t value of ``b_promotion`` on the look's ``df``). The interval
    decides promotion (its far end within an absolute margin means non-inferior, exactly; a relative margin
    is tested in the Fieller form, so there it is close, not exact); it plays no part in a rollback, which
    compares the difference itself with the threshold.
    """
    low, high = _interval(ev)
    sign = -1.0 if ev.get("direction") == "increase" else 1.0
    rollback = rollback_threshold(ev)
    margin = _float(_first(ev, "margin_abs", "margin"))
    return MetricPoint(
        label=label,
        difference=_float(_first(ev, "diff", "difference", "delta")),
        low=low,
        high=high,
        rollback_bound=rollback,
        noninferiority_bound=None if margin is None else sign * margin,
        status=_status(ev),
    )


def _looks(run: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """Every look of the run in order: (label, step, look)."""
    out = []
    for step in run.get("steps") or []:
        looks = step.get("looks") or []
        for j, look in enumerate(looks, start=1):
            label = f"step {step.get('step_index', '?')}"
            if len(looks) > 1:
                label += f" look {j}"
            label += f" ({_pct_text(step.get('percent'))})"
            out.append((label, step, look))
    return out


def _pct_text(value: Any) -> str:
    f = _float(value)
    return "?" if f is None else f"{f:g}%"


# --------------------------------------------------------------------------------------------------------
# plots (matplotlib Agg, imported lazily)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def traffic_series(run: Mapping[str, Any]) -> list[tuple[datetime, float]]:
    """The canary share over time as a step function: 0 before the rollout, each step's percent from its
    ``step_started_at``, and ``final_percent`` at ``finished_at``."""
    points: list[tuple[datetime, float]] = []
    start = _time(run.get("started_at"))
    steps = [s for s in run.get("steps") or [] if _time(s.get("step_started_at"))]
    if start is None and steps:
        start = _time(steps[0]["step_started_at"])
    if start is not None:
        points.append((start, 0.0))
    for step in steps:
        at = _time(step["step_started_at"])
        pct = _float(step.get("percent")) or 0.0
        if points:
            points.append((at, points[-1][1]))
        points.append((at, pct))
        for look in step.get("looks") or []:
            look_at = _time(look.get("look_at"))
            if look_at is not None:
                points.append((look_at, pct))
    end = _time(run.get("finished_at"))
    final = _float(run.get("final_percent"))
    if end is not None and points:
        points.append((end, points[-1][1]))
        if final is not None:
            points.append((end, final))
    points.sort(key=lambda p: p[0])
    return points


def _traffic_png(run: Mapping[str, Any]) -> str | None:
    series = traffic_series(run)
    if len(series) < 2:
        return None
    plt = _pyplot()
    import matplotlib.dates as mdates

    fig, ax = plt.subplots(figsize=(8, 3))
    xs = [p[0] for p in series]
    ys = [p[1] for p in series]
    ax.plot(xs, ys, drawstyle="default", color="#1f77b4", lw=2, label="canary share")
    look_x, look_y = [], []
    for _label, step, look in _looks(run):
        at = _time(look.get("look_at"))
        if at is not None:
            look_x.append(at)
            look_y.append(_float(step.get("percent")) or 0.0)
    if look_x:
        ax.scatter(look_x, look_y, color="#d62728", zorder=3, label="look (analysis)")
    ax.set_ylabel("canary traffic (%)")
    ax.set_ylim(-2, max(100.0, max(ys)) + 5)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def metric_points(run: Mapping[str, Any]) -> dict[str, list[MetricPoint]]:
    """Per metric name, the evidence at every look in order."""
    out: dict[str, list[MetricPoint]] = {}
    for label, _step, look in _looks(run):
        for ev in _metrics_of(look.get("verdict") or {}):
            out.setdefault(str(ev.get("name")), []).append(_point(label, ev))
    return out


#: Legend labels of the metric plot (tests find the drawn lines by them).
ESTIMATE_LABEL = "difference (canary − stable), bars: promotion interval"
ROLLBACK_LABEL = "rollback threshold: the dot past it rolls back"
MARGIN_LABEL = "non-inferiority margin: the bar's far end within it promotes"


def _metric_png(name: str, points: list[MetricPoint]) -> str | None:
    fig = metric_figure(name, points)
    return None if fig is None else _png(fig)


def metric_figure(name: str, points: list[MetricPoint]):
    """The matplotlib figure of one metric over the looks (``None`` when no look has a difference)."""
    if not any(p.difference is not None for p in points):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    xs = list(range(len(points)))
    diffs = [p.difference if p.difference is not None else float("nan") for p in points]
    lows = [p.difference - p.low if p.low is not None and p.difference is not None else 0.0 for p in points]
    highs = [p.high - p.difference if p.high is not None and p.difference is not None else 0.0 for p in points]
    ax.errorbar(xs, diffs, yerr=[lows, highs], fmt="o", color="#1f77b4", capsize=4, label=ESTIMATE_LABEL)
    ax.axhline(0.0, color="#888", lw=0.8)
    rb = [p.rollback_bound if p.rollback_bound is not None else float("nan") for p in points]
    if any(not math.isnan(v) for v in rb):
        ax.plot(xs, rb, "--", color="#d62728", marker="_", label=ROLLBACK_LABEL)
    ni = [p.noninferiority_bound if p.noninferiority_bound is not None else float("nan") for p in points]
    if any(not math.isnan(v) for v in ni):
        ax.plot(xs, ni, ":", color="#2ca02c", marker="_", label=MARGIN_LABEL)
    ax.set_xticks(xs)
    ax.set_xticklabels([p.label for p in points], rotation=20, fontsize=8)
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
.outcome{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:bold}
.promoted{background:#2e7d32}.rolled_back{background:#c62828}.failed{background:#6a1b9a}
.paused,.running,.skipped{background:#616161} img{max-width:100%}
"""


def _kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _num(value)
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return _dict_rows_table(value)
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        return _dict_rows_table([{"": k, **v} for k, v in value.items()])
    if isinstance(value, Mapping | list | tuple):
        return f"<code>{_e(json.dumps(value, default=str, sort_keys=True))}</code>"
    return _e(value)


def _dict_rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    rows = [r for r in rows if isinstance(r, Mapping)]
    if not rows:
        return "<p>&ndash;</p>"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = ""
    for r in rows:
        cells = "".join(
            f"<td class='num'>{_num(r.get(c))}</td>" if isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
            else f"<td>{_cell(r.get(c))}</td>"
            for c in columns
        )
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_table(points: list[MetricPoint]) -> str:
    rows = [
        {"look": p.label, "difference": p.difference, "interval low": p.low, "interval high": p.high,
         "rollback threshold": p.rollback_bound, "non-inferiority margin": p.noninferiority_bound,
         "status": p.status}
        for p in points
    ]
    return _dict_rows_table(rows)


_EVIDENCE_COLUMNS = ("name", "critical", "stable", "canary", "diff", "interval", "z_harm", "b_rollback", "z_ni",
                     "b_promotion", "margin", "information", "samples", "note")


def _look_evidence_table(verdict: Mapping[str, Any]) -> str:
    metrics = _metrics_of(verdict)
    if not metrics:
        return ""
    rows = []
    for ev in metrics:
        keys = [k for k in _EVIDENCE_COLUMNS if k in ev] or list(ev)
        row = {("metric" if k == "name" else k): ev.get(k) for k in keys}
        row["result"] = _status(ev)
        rows.append(row)
    return _dict_rows_table(rows)


def _section_drift(drift: Any) -> str:
    if not drift:
        return ""
    html = "<h2>Drift after promotion</h2>"
    if isinstance(drift, Mapping):
        features = _first(drift, "features", "results", "table")
        summary = [(k, v) for k, v in drift.items() if k not in {"features", "results", "table"}]
        if summary:
            html += _kv_table(summary)
        if isinstance(features, Mapping):
            features = [{"feature": k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in features.items()]
        if isinstance(features, list):
            html += _dict_rows_table(features)
    elif isinstance(drift, list):
        html += _dict_rows_table(drift)
    else:
        html += f"<pre>{_e(drift)}</pre>"
    return html


_ROOT_CAUSE_TITLES = {"closest_to_drifting": "closest to drifting (none drifted)"}


def _split_drifting(root: Mapping[str, Any]) -> dict[str, Any]:
    """``top_drifting_features`` with only the features that drifted; the rest, when none did, under
    ``closest_to_drifting`` (root causes written before the split listed undrifted features as drifting)."""
    root = dict(root)
    rows = root.get("top_drifting_features")
    if isinstance(rows, list) and rows and all(isinstance(r, Mapping) and "drifted" in r for r in rows):
        drifted = [r for r in rows if r.get("drifted")]
        root["top_drifting_features"] = drifted
        if not drifted and not root.get("closest_to_drifting"):
            root["closest_to_drifting"] = rows
    return root


def _section_power_warnings(warnings: Any) -> str:
    """Pre-flight's warnings that the schedule cannot power a metric's promotion test (or its margin is 0)."""
    items = [w.get("message") if isinstance(w, Mapping) else w for w in warnings or []]
    items = [str(i) for i in items if i]
    if not items:
        return ""
    return ("<h2>Pre-flight warnings</h2><p>The run went ahead; these limit what it could show:</p><ul>"
            + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")


def _section_root_cause(root: Any) -> str:
    if not root:
        return ""
    html = "<h2>Root cause of the rollback</h2>"
    if isinstance(root, str):
        return html + f"<pre>{_e(root)}</pre>"
    if isinstance(root, Mapping):
        text = _first(root, "text", "summary")
        if text:
            html += f"<pre>{_e(text)}</pre>"
        root = _split_drifting(root)
        for key, value in root.items():
            if key in {"text", "summary"} or value in (None, [], {}):
                continue
            html += f"<h3>{_e(_ROOT_CAUSE_TITLES.get(key, key.replace('_', ' ')))}</h3>"
            if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
                html += _dict_rows_table(value)
            elif isinstance(value, Mapping):
                html += _kv_table(value.items())
            else:
                html += f"<p>{_cell(value)}</p>"
        return html
    return html + f"<pre>{_e(root)}</pre>"


def render_report(run: Mapping[str, Any]) -> str:
    """The report as one HTML string (no external resources)."""
    if not isinstance(run, Mapping):
        raise ReportError(f"run must be a dict built from the run's XComs, got {type(run).__name__}")
    outcome = str(run.get("outcome") or "running")
    title = f"Rollout of {run.get('model')}: {run.get('candidate')} vs {run.get('stable')}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p><span class='outcome {_e(re.sub(r'[^a-z_]', '', outcome))}'>{_e(outcome.replace('_', ' '))}</span> "
        f"{_e(run.get('reason'))}</p>",
        _kv_table([
            ("model", run.get("model")), ("stable", run.get("stable")), ("candidate", run.get("candidate")),
            ("run id", run.get("run_id")), ("DAG", run.get("dag_id")),
            ("started", run.get("started_at")), ("finished", run.get("finished_at")),
            ("final canary share", _pct_text(run.get("final_percent")) if run.get("final_percent") is not None else None),
            ("report written", datetime.now(UTC).isoformat(timespec="seconds")),
        ]),
    ]

    plan = run.get("power_plan")
    parts.append(_section_power_warnings(run.get("power_warnings") or (
        plan.get("power_warnings") if isinstance(plan, Mapping) else None)))

    parts.append("<h2>Traffic share over time</h2>")
    traffic = _traffic_png(run)
    parts.append(
        f"<img alt='canary traffic share over time' src='data:image/png;base64,{traffic}'>" if traffic
        else "<p>No traffic step was taken in this run.</p>"
    )
    steps = run.get("steps") or []
    if steps:
        parts.append(_dict_rows_table(
            [{"step": s.get("step_index"), "percent": s.get("percent"), "started at": s.get("step_started_at"),
              "looks": len(s.get("looks") or []),
              "decision": ((s.get("looks") or [{}])[-1].get("verdict") or {}).get("decision")} for s in steps]
        ))

    points = metric_points(run)
    if points:
        parts.append("<h2>Metrics at every look</h2>")
        parts.append("<p>Everything is in the metric's units: the dot is the difference, canary minus stable. "
                     "<b>Rollback</b> compares the dot itself with the red rollback threshold, the difference "
                     "at which the harm statistic z_harm reaches its boundary (b_rollback times the standard "
                     "error, t-adjusted when the judge had few degrees of freedom). The bars are the promotion "
                     "interval (diff ± t × se, t the promotion boundary on the look's degrees of freedom): the run <b>promotes</b> only when every metric's bar "
                     "stays within its green non-inferiority margin. A bar may cross the red line without a "
                     "rollback. The circuit breaker, a separate always-valid test, can also roll back (see the "
                     "decision records).</p>")
        for name, pts in points.items():
            parts.append(f"<h3>{_e(name)}</h3>")
            png = _metric_png(name, pts)
            if png:
                parts.append(f"<img alt='{_e(name)} at every look' src='data:image/png;base64,{png}'>")
            parts.append(_metric_table(pts))

    looks = _looks(run)
    records = list(run.get("decision_records") or [])
    if looks or records:
        parts.append("<h2>Decision records</h2>")
        for label, _step, look in looks:
            verdict = look.get("verdict") or {}
            parts.append(f"<h3>{_e(label)} at {_e(look.get('look_at'))}: {_e(verdict.get('decision'))}</h3>")
            parts.append(f"<p>{_e(verdict.get('reason'))}</p>")
            parts.append(_look_evidence_table(verdict))
            gates = [(k, verdict.get(k)) for k in ("srm", "data_quality", "drift") if verdict.get(k) not in (None, {}, [])]
            if gates:
                parts.append(_kv_table(gates))
            if look.get("record"):
                parts.append(f"<pre>{_e(look['record'])}</pre>")
        for text in records:
            parts.append(f"<pre>{_e(text)}</pre>")

    parts.append(_section_root_cause(run.get("root_cause")))
    parts.append(_section_drift(run.get("drift")))
    if run.get("power_plan"):
        parts.append("<h2>Power plan</h2>")
        plan = run["power_plan"]
        parts.append(_kv_table((k, v) for k, v in plan.items() if k != "power_warnings")
                     if isinstance(plan, Mapping) else f"<pre>{_e(plan)}</pre>")
    if run.get("notifications"):
        parts.append("<h2>Notifications</h2>")
        parts.append(_dict_rows_table(list(run["notifications"])))
    if run.get("spec"):
        parts.append("<h2>Resolved spec</h2>")
        parts.append(f"<pre>{_e(json.dumps(run['spec'], indent=2, default=str, sort_keys=True))}</pre>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(run: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Render the run's report and write it to ``out_dir/<model>/<model>__<run id>.html``.

    The file is written to a temporary name and renamed, so a reader never sees half a report.
    Returns the path of the written file.
    """
    html = render_report(run)
    model_dir = _SAFE_NAME.sub("_", str(run.get("model") or "model")).strip("._") or "model"
    folder = Path(out_dir) / model_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / report_filename(run)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path.resolve()


def build_run(
    plan: Mapping[str, Any] | None,
    pre: Mapping[str, Any] | None = None,
    *,
    steps: Sequence[Mapping[str, Any] | None] = (),
    analyses: Sequence[Mapping[str, Any] | None] = (),
    outcome: str = "running",
    reason: str | None = None,
    final_percent: float | None = None,
    finished_at: str | None = None,
    root_cause: Any = None,
    drift: Any = None,
    notifications: Sequence[Mapping[str, Any]] | None = None,
    dag_id: str | None = None,
) -> dict[str, Any]:
    """Assemble the run dict of :func:`write_report` from the run's XComs.

    :param plan: ``validate``'s XCom (may be None when validation failed).
    :param pre: ``preflight``'s XCom.
    :param steps: per step in order, ``set_traffic``'s XCom (``step_index``, ``percent``,
        ``step_started_at``) merged with ``hold``'s (``look_at``); None for steps that did not run.
    :param analyses: per step in order, ``analyze``'s XCom (``verdict``, ``record``, optionally ``looks``:
        every look of that step, each ``{"look_at", "verdict", "record"}``); None for steps not analysed.
    """
    if outcome not in OUTCOMES:
        raise ReportError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
    plan = plan or {}
    pre = pre or {}
    spec = plan.get("spec") or {}
    run_steps = []
    for i, step in enumerate(steps):
        if not step:
            continue
        analysis = analyses[i] if i < len(analyses) else None
        looks: list[dict[str, Any]] = []
        if analysis:
            if analysis.get("looks"):
                looks = [dict(look) for look in analysis["looks"]]
            elif analysis.get("verdict"):
                looks = [{"look_at": _first(analysis, "look_at") or step.get("look_at"),
                          "verdict": analysis["verdict"], "record": analysis.get("record")}]
        run_steps.append({
            "step_index": step.get("step_index", i + 1),
            "percent": step.get("percent"),
            "step_started_at": step.get("step_started_at"),
            "looks": looks,
        })
    model = spec.get("model") or pre.get("model")
    return {
        "model": model,
        "stable": pre.get("stable"),
        "candidate": pre.get("candidate") or plan.get("candidate"),
        "run_id": plan.get("run_id"),
        "dag_id": dag_id or (f"canary_rollout__{model}" if model else None),
        "outcome": outcome,
        "reason": reason,
        "started_at": pre.get("rollout_started_at"),
        "finished_at": finished_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "final_percent": final_percent,
        "steps": run_steps,
        "root_cause": root_cause,
        "drift": drift,
        "power_plan": pre.get("power_plan"),
        "power_warnings": pre.get("power_warnings") or (pre.get("power_plan") or {}).get("power_warnings") or [],
        "notifications": list(notifications or []),
        "spec": spec or None,
    }
