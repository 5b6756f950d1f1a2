"""The decision record: a plain-text table for the task log, readable at 3 a.m."""

from __future__ import annotations

import math
from typing import Any

NEXT = {
    "advance": "next: move to the next traffic step",
    "promote": "next: promote the candidate to 100 % and record it in the registry",
    "rollback": "next: canary to 0 %, root-cause report, notify; the run ends failed",
    "extend": "next: keep holding and look again (at the cap the spec's on_inconclusive applies)",
}


def _f(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def verdict_text(v: dict[str, Any]) -> str:
    """Render ``Verdict.to_dict()`` as a table."""
    lines = [f"DECISION: {v['decision'].upper()}  (look {v.get('look', 0) + 1}"
             f"{', last step' if v.get('is_last_step') else ''})",
             f"reason:   {v['reason']}", NEXT.get(v["decision"], ""), ""]
    head = ["metric", "stable", "canary", "diff", "interval", "z_harm", "rollback@", "z_ni", "promote@",
            "margin", "info", "n stable/canary", "result"]
    rows = [head]
    for m in v.get("metrics", []):
        iv = m.get("interval")
        res = ("HARM" if m.get("harm") else "non-inferior" if m.get("non_inferior") else
               "inconclusive" if m.get("tested") else "not tested")
        if m.get("breaker") and m["breaker"].get("tripped"):
            res = "HARM+BREAKER" if m.get("harm") else "BREAKER"
        n = m.get("samples") or {}
        rows.append([m["name"] + ("*" if m.get("critical") else ""), _f(m.get("stable")), _f(m.get("canary")),
                     _f(m.get("diff")), f"[{_f(iv[0])}, {_f(iv[1])}]" if iv else "-", _f(m.get("z_harm"), 3),
                     _f(m.get("b_rollback"), 3), _f(m.get("z_ni"), 3), _f(m.get("b_promotion"), 3),
                     _f(m.get("margin")), _f(m.get("information"), 3),
                     f"{n.get('stable', 0)}/{n.get('canary', 0)}", res])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(* critical; diff = canary - stable; boundaries are on the z scale)")
    srm = v.get("srm") or {}
    if srm:
        p = srm.get("p_value")
        lines.append(f"sample ratio: p = {_f(p, 3)} (alpha {srm.get('alpha')}) -> "
                     f"{'MISMATCH' if srm.get('mismatch') else 'ok'}; " + ", ".join(
                         f"step {s['step'] + 1}: canary {s['canary']} / stable {s['stable']} {s['counted']}"
                         for s in srm.get("steps", [])))
    for name, lab in (v.get("labels") or {}).items():
        lines.append(f"labelled share {name}: stable {_f(lab.get('stable_share'), 3)}, canary "
                     f"{_f(lab.get('canary_share'), 3)}, p = {_f(lab.get('p_value'), 3)} -> "
                     f"{'MISMATCH' if lab.get('mismatch') else 'ok'}")
    dq = v.get("data_quality")
    if dq is not None:
        lines.append(f"data quality: {'ok' if dq.get('success') else 'FAILED'} ({dq.get('evaluated', '?')} "
                     f"expectations on {dq.get('rows', '?')} canary rows)")
        for f in dq.get("failures", []):
            lines.append(f"  - {f.get('expectation')} {f.get('column') or ''}: observed {f.get('observed')}")
    dr = v.get("drift")
    if dr is not None:
        line = f"input drift between arms: {', '.join(map(str, dr.get('drifted', []))) or 'none'}"
        skipped = dr.get("not_compared") or {}
        if skipped:  # "none" must not cover a feature that could not be compared
            line += "; not compared (stable = reference, canary = current): " + "; ".join(
                f"{c} ({why})" for c, why in skipped.items())
        lines.append(line)
    return "\n".join(lines)
