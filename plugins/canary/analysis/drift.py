"""Drift between two samples: PSI for numbers, Jensen-Shannon for categories, KS statistic as effect size.

Used between the arms during a step (stable = reference, canary = current: a difference in *inputs*
means the routing is biased) and between the pre-rollout reference window and the live window after
promotion. Samples are bounded (``drift.sample_size`` rows per side, 20,000 by default, drawn by the
database), and thresholds are calibrated to those sample sizes, because p-values alone flag noise at
millions of rows:

* PSI on ``B`` quantile bins of the reference (counts + 0.5 so empty bins stay finite). Under no drift,
  PSI is about ``(1/n + 1/m) * chi2_{B-1}`` (Yurdakul and Naranjo), so the flag is
  ``PSI > max(psi_floor, (1/n + 1/m) * chi2_{B-1, 0.999})``.
* Jensen-Shannon divergence (natural log) of category shares; under no drift it is about
  ``(1/n + 1/m) * chi2_{K-1} / 8``, so the flag is ``JS > max(psi_floor / 8, (1/n + 1/m) chi2_{K-1,0.999} / 8)``.
* The two-sample KS statistic is reported for numeric columns as an effect size (with its p-value).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

LOG_COLUMNS = ("request_id", "ts", "arm", "version", "unit_id", "status", "error", "latency_ms", "step", "percent")


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> tuple[float, int]:
    """PSI of ``current`` against quantile bins of ``reference``; returns (psi, number of bins used)."""
    ref, cur = np.asarray(reference, float), np.asarray(current, float)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if len(ref) == 0 or len(cur) == 0:
        return float("nan"), 0
    edges = np.unique(np.quantile(ref, np.arange(1, bins) / bins))
    cr = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) + 0.5
    cc = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) + 0.5
    p, q = cr / cr.sum(), cc / cc.sum()
    return float(np.sum((q - p) * np.log(q / p))), len(edges) + 1


def js_divergence(reference: Any, current: Any) -> tuple[float, int]:
    """Jensen-Shannon divergence (nats) of category shares; missing values are a category of their own."""
    import pandas as pd

    r = pd.Series(reference).astype(object).where(pd.notna(reference), "<null>").astype(str)
    c = pd.Series(current).astype(object).where(pd.notna(current), "<null>").astype(str)
    cats = sorted(set(r) | set(c))
    p = r.value_counts().reindex(cats, fill_value=0).to_numpy(float)
    q = c.value_counts().reindex(cats, fill_value=0).to_numpy(float)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan"), len(cats)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q), len(cats)


def psi_threshold(n: int, m: int, bins: int, floor: float = 0.1) -> float:
    """``max(floor, (1/n + 1/m) * chi2_{bins-1, 0.999})``."""
    return max(floor, (1 / n + 1 / m) * float(stats.chi2.ppf(0.999, max(bins - 1, 1))))


def compare_column(reference: Any, current: Any, bins: int = 10, psi_floor: float = 0.1) -> dict[str, Any]:
    """Drift of one column: numeric (PSI + KS) or categorical (JS), with its calibrated threshold."""
    import pandas as pd

    rs, cs = pd.Series(reference), pd.Series(current)
    numeric = pd.api.types.is_numeric_dtype(rs) and pd.api.types.is_numeric_dtype(cs) and not (
        pd.api.types.is_bool_dtype(rs))
    if numeric:
        ref, cur = rs.to_numpy(float), cs.to_numpy(float)
        ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
        if len(ref) < 2 or len(cur) < 2:
            return {"kind": "numeric", "drifted": False, "note": "too few values", "n_ref": len(ref), "n_cur": len(cur)}
        value, used = psi(ref, cur, bins)
        thr = psi_threshold(len(ref), len(cur), used, psi_floor)
        ks = stats.ks_2samp(ref, cur)
        return {"kind": "numeric", "psi": value, "threshold": thr, "drifted": bool(value > thr), "bins": used,
                "ks": float(ks.statistic), "ks_p_value": float(ks.pvalue), "n_ref": len(ref), "n_cur": len(cur)}
    value, k = js_divergence(rs, cs)
    n, m = len(rs), len(cs)
    if not n or not m:
        return {"kind": "categorical", "drifted": False, "note": "no values", "n_ref": n, "n_cur": m}
    thr = max(psi_floor / 8, (1 / n + 1 / m) * float(stats.chi2.ppf(0.999, max(k - 1, 1))) / 8)
    return {"kind": "categorical", "js": value, "threshold": thr, "drifted": bool(value > thr), "categories": k,
            "n_ref": n, "n_cur": m}


def compare_frames(reference: Any, current: Any, columns: list[str] | str = "all", bins: int = 10,
                   psi_floor: float = 0.1) -> dict[str, Any]:
    """Drift per column between two DataFrames (features, ``prediction`` and ``score``).

    ``columns="all"`` takes every column present in both except the log's own bookkeeping columns.
    Returns ``{"columns": {name: result}, "drifted": [names], "not_compared": {name: why}}``: a column with
    fewer than two values on either side (e.g. a feature only the candidate's callers send) cannot be
    compared, and is named instead of being counted as "no drift".
    """
    if columns == "all":
        cols = [c for c in reference.columns if c in current.columns and c not in LOG_COLUMNS]
    else:
        missing = [c for c in columns if c not in reference.columns or c not in current.columns]
        if missing:
            raise ValueError(f"drift.features lists {missing}, which the logged rows do not have: use names from "
                             "the model's features (or 'all')")
        cols = list(columns)
    out = {c: compare_column(reference[c], current[c], bins, psi_floor) for c in cols}
    return {"columns": out, "drifted": [c for c, r in out.items() if r.get("drifted")],
            "not_compared": {c: f"{r['note']}: {r.get('n_ref', 0)} reference / {r.get('n_cur', 0)} current"
                             for c, r in out.items() if r.get("note")}}


def compare_windows(reference: Any, current: Any, columns: list[str] | str = "all", bins: int = 10,
                    psi_floor: float = 0.1) -> dict[str, Any]:
    """Live window against the pre-rollout reference (after promotion): :func:`compare_frames`."""
    return compare_frames(reference, current, columns, bins, psi_floor)


def compare_arms(stable: Any, canary: Any = None, columns: list[str] | str = "all", bins: int = 10,
                 psi_floor: float = 0.1, inputs_only: bool = True) -> dict[str, Any]:
    """Drift between the arms (stable = reference) during a step.

    Pass the two arms' rows, or one DataFrame with an ``arm`` column as ``stable`` and ``canary=None``.
    With ``inputs_only`` the model outputs (``prediction``, ``score``) are reported but do not count as
    drift: two models are supposed to answer differently; their inputs are not.
    """
    if canary is None:
        stable, canary = stable[stable["arm"] == "stable"], stable[stable["arm"] == "canary"]
    res = compare_frames(stable, canary, columns, bins, psi_floor)
    if inputs_only:
        res["drifted"] = [c for c in res["drifted"] if c not in ("prediction", "score")]
    return res
