"""Sufficient statistics per (metric, arm, step, time cluster) and the stratified two-arm comparison.

Every number the judge tests comes from :func:`compare`: per step the difference of the arms' means and
its variance, cluster-robust ("CR1") over the time clusters of ``policy.cluster_seconds`` (one minute by
default) that the arms share, so noise over time that is independent between the arms is counted and noise
common to both (the same load, the same traffic mix) cancels; never below the per-request variance. Steps
are combined with Cochran-Mantel-Haenszel weights (``n_canary * n_stable / (n_canary + n_stable)`` per step;
they do not depend on the outcomes). A step gets G - 1 degrees of freedom when its cluster variance is used
(G: the clusters of the arm with fewer), so a shorter width gives more clusters and narrower boundaries, as
long as the noise it must absorb (replica load, traffic mix) varies on a longer scale than the width.
Combining within steps means a ramping canary share plus a base rate that drifts over the day cannot create
a difference. Degrees of freedom follow Welch-Satterthwaite over the steps, and the t statistic is mapped to
the z scale (same tail probability) so group-sequential boundaries apply unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from canary.analysis.policy import MetricPolicy, Policy

ARMS = ("stable", "canary")


@dataclass
class MetricCells:
    """Sufficient statistics of one metric: one entry per (arm, step, cluster).

    :param canary: True for the canary arm, False for stable.
    :param step: step index (0-based) of the cell.
    :param cluster: time cluster id (any integer; the SQL and :meth:`ArmStats.from_frame` use epoch seconds
        // ``policy.cluster_seconds``).
    :param n: observations in the cell; :param s1: their sum; :param s2: their sum of squares.
    """

    canary: np.ndarray
    step: np.ndarray
    cluster: np.ndarray
    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray

    @classmethod
    def from_arrays(cls, canary, step, cluster, n, s1, s2) -> MetricCells:
        return cls(np.asarray(canary, dtype=bool), np.asarray(step, dtype=np.int64),
                   np.asarray(cluster, dtype=np.int64), np.asarray(n, dtype=float),
                   np.asarray(s1, dtype=float), np.asarray(s2, dtype=float))

    def samples(self) -> tuple[int, int]:
        """(stable, canary) observation counts."""
        return int(self.n[~self.canary].sum()), int(self.n[self.canary].sum())


@dataclass
class ArmStats:
    """Everything the judge needs, aggregated: per-metric cells, traffic per step and arm, label coverage.

    :param metrics: metric name -> :class:`MetricCells`.
    :param traffic: one dict per (step, arm): ``step``, ``arm``, ``requests``, ``units`` (distinct unit ids,
        0 when unknown) and ``percent`` (the canary percent of that step, when known).
    :param labels: label metric name -> ``{arm: {"eligible": int, "labelled": int}, "steps": [{"step",
        arm: {...}}]}`` (predictions old enough for their label at the look time, and how many of them
        have one; per step for the stratified labelled-share test).
    :param thresholds: latency thresholds (ms) actually used, per metric name.
    """

    metrics: dict[str, MetricCells]
    traffic: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, df: Any, policy: Policy, thresholds: dict[str, float] | None = None) -> ArmStats:
        """Aggregate per-request observations (Contract 3 DataFrame form).

        Columns: ``arm`` (stable/canary; other arms are ignored), ``step`` (int), ``ts`` (datetime, the
        time cluster is epoch seconds // ``policy.cluster_seconds``), one column per metric name (per-request value, NaN when not
        observable), optionally ``percent`` (canary percent of the step) and ``unit_id``. For a
        ``latency_threshold`` metric the column holds the latency in ms, or the 0/1 exceedance when its
        threshold is not numeric and not in ``thresholds``. Label metrics count only rows older than
        their label delay at the newest row's time (the look time as far as the frame can tell).
        """
        import pandas as pd

        need = {"arm", "step", "ts"} | {m.name for m in policy.metrics}
        missing = sorted(need - set(df.columns))
        if missing:
            raise ValueError(f"observations lack columns {missing}: give one column per metric name plus "
                             "arm, step and ts (see Contract 3)")
        df = df[df["arm"].isin(ARMS)]
        cluster = pd.to_datetime(df["ts"]).astype("datetime64[s]").astype("int64") // policy.cluster_seconds
        base = pd.DataFrame({"canary": (df["arm"] == "canary").to_numpy(), "step": df["step"].astype(int).to_numpy(),
                             "cluster": cluster.to_numpy()})
        thresholds = dict(thresholds or {})
        metrics: dict[str, MetricCells] = {}
        labels: dict[str, dict[str, Any]] = {}
        for m in policy.metrics:
            x = pd.to_numeric(df[m.name], errors="coerce").to_numpy(dtype=float)
            if m.kind == "latency_threshold":
                thr = m.threshold if isinstance(m.threshold, int | float) else thresholds.get(m.name)
                if thr is not None:
                    x = np.where(np.isnan(x), np.nan, (x > float(thr)).astype(float))
                    thresholds[m.name] = float(thr)
            ok = ~np.isnan(x)
            if m.needs_labels:
                # eligible: older than the label delay at the look, taken as the newest row's time
                tsv = pd.to_datetime(df["ts"]).to_numpy()
                elig = tsv <= (tsv.max() - np.timedelta64(int(m.label_delay_s * 1e6), "us")) if len(tsv) else ok
                x = np.where(elig, x, np.nan)
                ok = ~np.isnan(x)
                can = base["canary"].to_numpy()
                stp = base["step"].to_numpy()

                def _counts(mask: np.ndarray, elig: np.ndarray = elig, ok: np.ndarray = ok) -> dict[str, int]:
                    return {"eligible": int((mask & elig).sum()), "labelled": int((mask & elig & ok).sum())}

                lab: dict[str, Any] = {arm: _counts(can == (arm == "canary")) for arm in ARMS}
                lab["steps"] = [{"step": int(s), **{arm: _counts((can == (arm == "canary")) & (stp == s))
                                                    for arm in ARMS}} for s in np.unique(stp)]
                labels[m.name] = lab
            g = base[ok].assign(x=x[ok], x2=x[ok] ** 2).groupby(["canary", "step", "cluster"], sort=True)
            agg = g.agg(n=("x", "size"), s1=("x", "sum"), s2=("x2", "sum")).reset_index()
            metrics[m.name] = MetricCells.from_arrays(agg["canary"], agg["step"], agg["cluster"], agg["n"],
                                                      agg["s1"], agg["s2"])
        traffic = []
        tcols = ["step", "arm"]
        t = df.assign(step=df["step"].astype(int)).groupby(tcols)
        has_units = "unit_id" in df.columns
        has_pct = "percent" in df.columns
        for (step, arm), part in t:
            traffic.append({"step": int(step), "arm": str(arm), "requests": int(len(part)),
                            "units": int(part["unit_id"].nunique()) if has_units else 0,
                            "percent": float(part["percent"].iloc[0]) if has_pct else None})
        return cls(metrics=metrics, traffic=traffic, labels=labels, thresholds=thresholds)


@dataclass(frozen=True)
class Comparison:
    """Canary minus stable for one metric, stratified by step.

    ``diff`` is canary - stable (metric units); ``se`` its standard error; ``df`` the Satterthwaite degrees
    of freedom; ``z_harm`` the one-sided harm statistic on the z scale (large = canary worse);
    ``z_ni`` the non-inferiority statistic (large = canary shown no worse than the margin);
    ``margin_abs`` the margin in metric units (relative margins use stable's estimate).
    """

    stable_mean: float
    canary_mean: float
    diff: float
    se: float
    df: float
    z_harm: float
    z_ni: float
    margin_abs: float
    n_stable: int
    n_canary: int
    clusters_stable: int
    clusters_canary: int
    steps: int


def t_to_z(t: float, df: float) -> float:
    """The z value with the same upper tail probability as ``t`` on ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return t
    if not math.isfinite(df) or df > 1e6:
        return t
    p = float(special.stdtr(df, -abs(t)))
    z = -float(special.ndtri(p)) if p > 0 else 38.0
    return math.copysign(float(z), t)


def z_to_t(z: float, df: float | None) -> float:
    """The inverse of :func:`t_to_z`: the t value on ``df`` degrees of freedom with the same upper tail
    probability as ``z``; ``z`` itself when ``df`` is unknown or infinite (a record stores an infinite
    ``df`` as null), as :func:`t_to_z` does above 1e6 degrees of freedom."""
    if df is None or not math.isfinite(df) or df > 1e6 or not math.isfinite(z):
        return z
    t = -float(special.stdtrit(df, float(special.ndtr(-abs(z)))))
    return math.copysign(t, z) if math.isfinite(t) else z


def _cells(c: MetricCells, nstep: int, step_idx: np.ndarray, binary: bool = False):
    """Per (step, arm) totals, mean, variance of the mean, degrees of freedom, clusters and the per-request
    variance of the mean (:func:`_iid_variance`, the floor of the cluster variance).

    ``binary``: a cell with no variation (no events, or only events: an error rate of 0 in 6,000 requests)
    gets the variance of a half-event pseudo-count, ``p (1 - p) / N`` with ``p = (x + 1/2) / (N + 1)``,
    instead of 0. Without it a guardrail that never fires could never be tested, and a critical metric like
    the error rate would block every promotion of a canary that makes no errors. The floor shrinks like
    ``1 / N``, so 0 errors in 200 requests cannot show non-inferiority at a 0.2 % margin, but 0 in 6,000 can
    (the exact upper 95 % bound, about 3 / N, agrees). Cells with variation keep their own variance."""
    key = step_idx * 2 + c.canary.astype(np.int64)
    size = nstep * 2
    has = c.n > 0
    N = np.bincount(key, c.n, size)
    S1 = np.bincount(key, c.s1, size)
    G = np.bincount(key[has], minlength=size).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = S1 / N
        e = c.s1 - m[key] * c.n
        R = np.bincount(key, e * e, size)
        v_cr = np.where(G >= 2, G / np.maximum(G - 1.0, 1.0) * R / (N * N), np.nan)
    v_iid = _iid_variance(c, nstep, step_idx, binary)
    use_cr = v_cr > v_iid
    v = np.where(use_cr, v_cr, v_iid)
    dfc = np.where(use_cr, G - 1.0, N - 1.0)
    return N, m, v, dfc, G, v_iid


def _iid_variance(c: MetricCells, nstep: int, step_idx: np.ndarray, binary: bool) -> np.ndarray:
    """Per (step, arm) the per-request variance of the mean (``s^2 / N``; a binary metric without variation
    gets the half-event pseudo-count of :func:`_cells`)."""
    key = step_idx * 2 + c.canary.astype(np.int64)
    size = nstep * 2
    N = np.bincount(key, c.n, size)
    S1 = np.bincount(key, c.s1, size)
    S2 = np.bincount(key, c.s2, size)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = S1 / N
        v = np.maximum(S2 / N - m * m, 0.0) * N / (N - 1.0) / N
        if binary:
            p = (S1 + 0.5) / (N + 1.0)
            v = np.where((N > 0) & (v <= 0.0), p * (1.0 - p) / N, v)
    return v


def _paired_sums(c: MetricCells, step_idx: np.ndarray, nstep: int, m: np.ndarray, N: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step ``sum_g a_g^2``, ``sum_g b_g^2`` and ``sum_g a_g b_g``, where ``a_g`` and ``b_g`` are the
    canary's and stable's residual sums in time cluster g over their arm's count (each arm's share of the
    difference's error from that cluster)."""
    key = step_idx * 2 + c.canary.astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (c.s1 - m[key] * c.n) / N[key]
    share = np.where(c.n > 0, share, 0.0)
    _, g = np.unique(np.stack([step_idx, c.cluster]), axis=1, return_inverse=True)
    g = g.ravel()
    ng = int(g.max()) + 1 if len(g) else 0
    a = np.bincount(g, np.where(c.canary, share, 0.0), ng)
    b = np.bincount(g, np.where(c.canary, 0.0, share), ng)
    gstep = np.zeros(ng, dtype=np.int64)
    gstep[g] = step_idx
    return np.bincount(gstep, a * a, nstep), np.bincount(gstep, b * b, nstep), np.bincount(gstep, a * b, nstep)


def compare(c: MetricCells, metric: MetricPolicy) -> Comparison | None:
    """Stratified comparison of the two arms; ``None`` when no step has data in both arms.

    Within a step the variance of ``canary - k * stable`` is cluster-robust over the time clusters:
    ``G / (G - 1) * sum_g (a_g - k b_g)^2`` (``a_g``, ``b_g``: :func:`_paired_sums`), on ``G - 1`` degrees
    of freedom, with G the clusters of the arm that has fewer (an arm in few clusters has residuals that sum
    to zero over those few, so they carry only that many degrees of freedom; counting the other arm's
    clusters would make the variance too small). Noise common to both arms in a cluster (the same load, the
    same traffic mix) cancels in the difference instead of being counted once per arm, and noise
    independent between the arms gives the same expected variance as the per-arm sum. It is never below
    the per-request variance of the difference (``k^2 v_stable + v_canary``, with the half-event floor of a
    binary metric); when that floor is larger it is used, with Welch-Satterthwaite degrees of freedom. An
    arm with fewer than two clusters in the step leaves the step to the per-arm variances of
    :func:`_cells` (each cluster-robust or per-request), summed, with Welch-Satterthwaite degrees of freedom.
    """
    steps, step_idx = np.unique(c.step, return_inverse=True)
    if len(steps) == 0:
        return None
    binary = metric.kind in ("binary", "latency_threshold")
    N, m, v, dfc, G, vi = _cells(c, len(steps), step_idx, binary=binary)
    Nb, Nc = N[0::2], N[1::2]
    valid = (Nb >= 2) & (Nc >= 2) & np.isfinite(v[0::2]) & np.isfinite(v[1::2])
    if not valid.any():
        return None
    w = np.where(valid, Nb * Nc / np.maximum(Nb + Nc, 1.0), 0.0)
    w = w / w.sum()
    mb, mc = np.where(valid, m[0::2], 0.0), np.where(valid, m[1::2], 0.0)
    # per-request (iid) variances of each arm's mean: the floor of the paired cluster variance
    vib, vic = np.where(valid, vi[0::2], 0.0), np.where(valid, vi[1::2], 0.0)
    dib, dic = np.maximum(Nb - 1.0, 1.0), np.maximum(Nc - 1.0, 1.0)
    A, B, C = _paired_sums(c, step_idx, len(steps), m, N)
    Gm = np.minimum(G[0::2], G[1::2])  # clusters of the arm with fewer, per step
    vab, vac = np.where(valid, v[0::2], 0.0), np.where(valid, v[1::2], 0.0)  # per-arm (CR or iid)
    dab, dac = np.maximum(dfc[0::2], 1.0), np.maximum(dfc[1::2], 1.0)
    stable_mean, canary_mean = float(w @ mb), float(w @ mc)
    diff = canary_mean - stable_mean
    sign = metric.sign

    def z_and_df(k: float, shift: float) -> tuple[float, float, float]:
        floor = k * k * vib + vic
        per_arm = k * k * vab + vac
        with np.errstate(invalid="ignore", divide="ignore"):
            pairable = Gm >= 2
            paired = np.where(pairable, Gm / np.maximum(Gm - 1.0, 1.0) * np.maximum(A - 2 * k * C + k * k * B, 0.0),
                              np.nan)
            use = pairable & (paired > floor)
            vs = np.where(valid, np.where(use, paired, np.where(pairable, floor, per_arm)), 0.0)
            # degrees of freedom per step: G - 1 for the paired cluster variance, else Welch-Satterthwaite
            # (over the per-request variances, or over the per-arm ones with their own degrees of freedom)
            dw = np.where(valid & (floor > 0), floor * floor / ((k * k * vib) ** 2 / dib + vic * vic / dic), 1.0)
            da = np.where(valid & (per_arm > 0), per_arm * per_arm / ((k * k * vab) ** 2 / dab + vac * vac / dac),
                          1.0)
            dfs = np.where(use, Gm - 1.0, np.where(pairable, dw, da))
        comp = w * w * vs
        var = float(comp.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            den = np.where(valid & (comp > 0), comp**2 / np.maximum(dfs, 1.0), 0.0).sum()
        dof = var * var / den if den > 0 else math.inf
        se = math.sqrt(var)
        est = float(w @ (mc - k * mb)) - shift
        return (est / se if se > 0 else (math.inf if est > 0 else -math.inf if est < 0 else 0.0)), se, dof

    th, se, dof = z_and_df(1.0, 0.0)
    z_harm = t_to_z(sign * th, dof)
    if metric.margin_type == "relative":
        k = 1.0 + sign * metric.margin
        tn, _, dof_n = z_and_df(k, 0.0)
        margin_abs = metric.margin * abs(stable_mean)
    else:
        tn, _, dof_n = z_and_df(1.0, sign * metric.margin)
        margin_abs = metric.margin
    z_ni = t_to_z(-sign * tn, dof_n)
    nb, nc = int(Nb.sum()), int(Nc.sum())
    return Comparison(stable_mean, canary_mean, diff, se, dof, z_harm, z_ni, margin_abs, nb, nc,
                      int(G[0::2].sum()), int(G[1::2].sum()), int(valid.sum()))
