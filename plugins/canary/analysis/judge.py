"""The judge: one look at a rollout's data, one :class:`Verdict` (Contract 3).

Per metric (see ``docs/decisions.md`` for the reasoning and the benchmark):

* **Rollback** when the one-sided harm statistic ``z_harm`` reaches its group-sequential boundary.
  ``alpha_rollback`` is split equally across metrics and spent over the information fraction with a
  Lan-DeMets spending function (Pocock-type by default). Each metric can roll the canary back on its own.
  Critical metrics are also watched by the always-valid circuit breaker.
* **Promote** (last step only) when every metric is non-inferior: ``z_ni`` reaches its boundary
  (O'Brien-Fleming-type spending of ``alpha_promotion``; an intersection of tests needs no split), and no
  gate fails: sample ratio, labelled share, data quality, input drift between arms.
* **Advance** (earlier steps) when no harm is shown, every critical metric could be tested and the gates
  hold. **Extend** otherwise; at the cap the caller applies ``on_inconclusive``.

The information fraction of a metric is its canary sample count over ``planned_canary_samples`` (or the
look index over ``planned_looks``). When traffic runs past the plan before the final look (the fraction
would pass 1 while steps remain), each further look before the last step spends half of the remaining
spending fraction (e.g. 0.6 -> 0.8 -> 0.9) while the boundaries use the actual information for the
correlation between looks; so harm can still be rolled back at every later step. The last step spends the
rest (t = 1) once it reaches the planned information, or at its final look (the cap). A metric that cannot be tested yet (too few samples, or fewer than
``policy.min_clusters`` time clusters of ``policy.cluster_seconds`` per arm) spends no alpha at that look. The look history keeps the fractions and boundaries, so a re-run gives the same
answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from canary.analysis.boundaries import boundaries
from canary.analysis.gates import circuit_breaker, labelled_share_test, srm_test
from canary.analysis.policy import Policy
from canary.analysis.stats import ArmStats, compare, z_to_t

DECISIONS = ("advance", "promote", "rollback", "extend")


@dataclass
class LookHistory:
    """Earlier looks of this run (JSON-serialisable, kept in XCom).

    ``looks`` holds one dict per look: ``{"look": k, "decision": ..., "metrics": {name: {"t": fraction or
    None when the metric was not tested, "b_rollback": ..., "b_promotion": ...}}}``.
    """

    looks: list[dict[str, Any]] = field(default_factory=list)

    def fractions(self, metric: str) -> list[float]:
        """Information fractions of the earlier looks at which ``metric`` was tested."""
        out = []
        for look in self.looks:
            t = look.get("metrics", {}).get(metric, {}).get("t")
            if t is not None:
                out.append(float(t))
        return out

    def times(self, metric: str) -> list[float]:
        """Actual information (``u``: canary samples over the plan, may exceed 1) of the same looks as
        :meth:`fractions`; histories written before it existed have ``u == t``."""
        out = []
        for look in self.looks:
            rec = look.get("metrics", {}).get(metric, {})
            if rec.get("t") is not None:
                out.append(float(rec["u"] if rec.get("u") is not None else rec["t"]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"looks": [dict(x) for x in self.looks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | LookHistory | None) -> LookHistory:
        if isinstance(d, LookHistory):
            return cls(looks=list(d.looks))
        return cls(looks=list((d or {}).get("looks", [])))


@dataclass
class MetricEvidence:
    """What one metric showed at this look (all numbers in the metric's units; diff = canary - stable)."""

    name: str
    kind: str
    direction: str
    critical: bool
    tested: bool
    stable: float | None = None
    canary: float | None = None
    diff: float | None = None
    interval: tuple[float, float] | None = None
    se: float | None = None
    df: float | None = None
    z_harm: float | None = None
    b_rollback: float | None = None
    z_ni: float | None = None
    b_promotion: float | None = None
    margin: float | None = None
    information: float | None = None
    samples: dict[str, int] = field(default_factory=dict)
    clusters: dict[str, int] = field(default_factory=dict)
    harm: bool = False
    non_inferior: bool = False
    breaker: dict[str, Any] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["interval"] = list(self.interval) if self.interval else None
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class Verdict:
    """The judge's answer: ``decision`` in advance | promote | rollback | extend, the ``reason`` and the
    evidence. ``history`` is the look history including this look (store it for the next look)."""

    decision: str
    reason: str
    metrics: list[MetricEvidence] = field(default_factory=list)
    srm: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    data_quality: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    look: int = 0
    is_last_step: bool = False
    history: LookHistory = field(default_factory=LookHistory)
    #: an ``extend`` that no later look can turn into a promotion: on the last step a metric spent all its
    #: promotion alpha (the plan's final analysis) without being shown non-inferior, so every later look
    #: has an infinite boundary for it. The caller treats it like the cap (``on_inconclusive``) instead of
    #: holding the canary's share with only the circuit breaker watching.
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (XCom)."""
        return {"decision": self.decision, "reason": self.reason, "look": self.look, "final": self.final,
                "is_last_step": self.is_last_step, "metrics": [m.to_dict() for m in self.metrics],
                "srm": self.srm, "labels": self.labels, "data_quality": self.data_quality, "drift": self.drift,
                "history": self.history.to_dict()}

    def to_text(self) -> str:
        """The decision record for the task log."""
        from canary.analysis.record import verdict_text

        return verdict_text(self.to_dict())


def _information(policy: Policy, n_canary: int, look: int) -> float:
    """Canary samples over the plan (or looks over the planned looks); not capped: may exceed 1."""
    if policy.planned_canary_samples:
        return n_canary / policy.planned_canary_samples
    return (look + 1) / policy.planned_looks


def _spending_fraction(u: float, prev_t: float | None, final: bool, last_step: bool) -> float:
    """The spending argument of this look: the information fraction while it is below 1; 1 at the final
    look, and on the last step once the planned information is reached (the plan's final analysis); past
    the plan on an earlier step half of what is left to spend, so every later step can still test."""
    prev = prev_t or 0.0
    if final or (last_step and u >= 1.0):
        return 1.0
    if u < 1.0:
        return max(u, prev)
    return prev + (1.0 - prev) / 2.0


def judge(observations: Any, policy: Policy, history: LookHistory | dict | None = None,
          is_last_step: bool = False, *, thresholds: dict[str, float] | None = None,
          data_quality: dict[str, Any] | None = None, drift: dict[str, Any] | None = None,
          final_look: bool = False) -> Verdict:
    """Decide one look. See the module docstring and Contract 3.

    :param observations: per-request ``pandas.DataFrame`` or :class:`~canary.analysis.stats.ArmStats`
        (from ``canary.analysis.sql.look_stats``) covering every step so far.
    :param policy: the decision policy.
    :param history: the previous looks (``Verdict.history`` of the last look, or its ``to_dict()``).
    :param is_last_step: the look belongs to the last traffic step (promotion possible).
    :param thresholds: latency thresholds (ms) for ``baseline_p95`` metrics (DataFrame input only).
    :param data_quality: result of ``canary.analysis.quality.validate`` on the canary's rows
        (``{"success": bool, "failures": [...]}``); a failure rolls back.
    :param drift: result of ``canary.analysis.drift.compare_arms``; ``{"drifted": [...]}`` non-empty blocks
        advance and promotion (the routing is biased).
    :param final_look: the last look the rollout will take (the last step at its cap). Its information
        fraction is 1 whatever was planned, so it spends all remaining alpha (Lan-DeMets: the final analysis
        is at t = 1 by definition). Without it a rollout whose traffic ran slower than planned reaches its cap
        at a small fraction, where the O'Brien-Fleming-type promotion boundary is far out of reach (about
        5.5 at t = 0.12), and a good canary is ended as inconclusive.
    """
    stats = observations if isinstance(observations, ArmStats) else ArmStats.from_frame(
        observations, policy, thresholds)
    hist = LookHistory.from_dict(history)
    look = len(hist.looks)
    a_rb = policy.alpha_rollback / len(policy.metrics)
    evidence: list[MetricEvidence] = []
    record: dict[str, Any] = {}
    for m in policy.metrics:
        ev = MetricEvidence(m.name, m.kind, m.direction, m.critical, tested=False)
        evidence.append(ev)
        record[m.name] = {"t": None}
        cells = stats.metrics.get(m.name)
        c = compare(cells, m) if cells is not None and len(cells.n) else None
        if c is None:
            ev.note = "no data in both arms yet"
            continue
        ev.stable, ev.canary, ev.diff, ev.se, ev.df = c.stable_mean, c.canary_mean, c.diff, c.se, c.df
        ev.samples = {"stable": c.n_stable, "canary": c.n_canary}
        ev.clusters = {"stable": c.clusters_stable, "canary": c.clusters_canary}
        ev.margin, ev.z_harm, ev.z_ni = c.margin_abs, c.z_harm, c.z_ni
        if min(c.n_stable, c.n_canary) < policy.min_samples or min(c.clusters_stable,
                                                                   c.clusters_canary) < policy.min_clusters:
            ev.note = (f"not tested: needs >= {policy.min_samples} samples and >= {policy.min_clusters} "
                       f"{policy.cluster_label} clusters per arm")
            continue
        if not math.isfinite(c.se) or c.se <= 0:
            ev.note = "not tested: no variation in either arm yet"
            continue
        prev, prev_u = hist.fractions(m.name), hist.times(m.name)
        u = max(_information(policy, c.n_canary, look), prev_u[-1] if prev_u else 0.0)
        t = _spending_fraction(u, prev[-1] if prev else None, final_look and is_last_step, is_last_step)
        fr, tm = [*prev, t], [*prev_u, u]
        ev.tested, ev.information = True, t
        ev.b_rollback = boundaries(fr, a_rb, policy.rollback_spending, policy.hsd_gamma, times=tm)[-1]
        ev.b_promotion = boundaries(fr, policy.alpha_promotion, policy.promotion_spending, policy.hsd_gamma,
                                    times=tm)[-1]
        ev.harm = c.z_harm >= ev.b_rollback
        ev.non_inferior = c.z_ni >= ev.b_promotion
        # the repeated confidence interval of this look: the t value of the promotion boundary on the
        # comparison's degrees of freedom, so its far end is within an absolute margin exactly when the
        # non-inferiority test passes
        q = z_to_t(ev.b_promotion if math.isfinite(ev.b_promotion) else 3.0, c.df)
        ev.interval = (c.diff - q * c.se, c.diff + q * c.se)
        record[m.name] = {"t": t, "u": u, "b_rollback": ev.b_rollback, "b_promotion": ev.b_promotion}
        if m.critical and policy.circuit_breaker_enabled:
            tau = max(abs(c.stable_mean), c.margin_abs, 4 * c.se)
            ev.breaker = circuit_breaker(m.sign * c.diff, c.se**2, tau, policy.circuit_breaker_alpha)

    srm = srm_test(stats.traffic, policy.srm_alpha, policy.expected_canary_share)
    labels = {name: labelled_share_test(lab, policy.srm_alpha) for name, lab in stats.labels.items()}
    decision, reason = _decide(policy, evidence, srm, labels, data_quality, drift, is_last_step)
    spent = [e.name for e in evidence if e.tested and not e.non_inferior and e.information is not None
             and e.information >= 1.0]
    final = decision == "extend" and is_last_step and bool(spent)
    if final:
        reason += (f"; {', '.join(spent)} spent all its promotion alpha (the plan's final analysis) without being "
                   "shown non-inferior, so no later look can promote: inconclusive")
    new_hist = LookHistory(looks=[*hist.looks, {"look": look, "decision": decision, "metrics": record}])
    return Verdict(decision, reason, evidence, srm, labels, data_quality, drift, look, is_last_step, new_hist,
                   final)


def _fmt(x: float | None) -> str:
    """A number for a reason; an infinite boundary (no alpha spent yet at this information) reads "inf",
    not "n/a", so the record says why the test could not pass."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.4g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _decide(policy: Policy, ev: list[MetricEvidence], srm: dict, labels: dict, dq: dict | None,
            drift: dict | None, last: bool) -> tuple[str, str]:
    causes = []  # every reason to roll back, not just the first: a broken canary is often broken twice
    harmed = [e for e in ev if e.harm]
    if harmed:
        parts = [f"{e.name}: canary {_fmt(e.canary)} vs stable {_fmt(e.stable)}, z_harm {_fmt(e.z_harm)} >= "
                 f"boundary {_fmt(e.b_rollback)}" for e in harmed]
        causes.append("harm shown on " + "; ".join(parts))
    tripped = [e for e in ev if e.breaker and e.breaker["tripped"] and not e.harm]
    if tripped:
        e = tripped[0]
        causes.append(f"circuit breaker on critical metric {e.name}: canary {_fmt(e.canary)} vs stable "
                      f"{_fmt(e.stable)} (log LR {_fmt(e.breaker['log_lr'])} >= {_fmt(e.breaker['threshold'])})")
    if dq is not None and not dq.get("success", True):
        names = ", ".join(f"{f.get('expectation')}({f.get('column', '')}) observed {f.get('observed')}"
                          for f in dq.get("failures", []))
        causes.append(f"data quality failed on the canary's rows: {names or 'see data_quality'}")
    if causes:
        return "rollback", "; and ".join(causes)
    blocks = []
    if srm.get("mismatch"):
        blocks.append(f"sample ratio mismatch (p = {srm['p_value']:.2g} < {srm['alpha']})")
    for name, lab in labels.items():
        if lab.get("mismatch"):
            blocks.append(f"labelled share differs between arms for {name} (stable {_fmt(lab['stable_share'])}, "
                          f"canary {_fmt(lab['canary_share'])}, p = {lab['p_value']:.2g})")
    if drift and drift.get("drifted"):
        blocks.append(f"inputs differ between arms (routing biased?): {', '.join(map(str, drift['drifted']))}")
    if blocks:
        return "extend", "untrustworthy data, no advance or promotion: " + "; ".join(blocks)
    if not last:
        missing = [e.name for e in ev if e.critical and not e.tested]
        if missing:
            return "extend", f"critical metrics not testable yet: {', '.join(missing)}"
        untested = [e for e in ev if not e.tested]
        reason = "no harm shown on any tested metric; gates hold" if untested else \
            "no harm shown on any metric; gates hold"
        if untested:  # a reader must not take "no harm shown" for metrics the look could not test
            reason += "; not tested at this look: " + "; ".join(f"{e.name} ({e.note or 'no data'})"
                                                                for e in untested)
        # Not a reason to stop (the harm test has not crossed its boundary), but a reader of "no harm shown"
        # should see which estimates already sit beyond their margin: the next step will look again.
        watch = [e for e in ev if e.tested and e.diff is not None and e.margin is not None
                 and policy.metric(e.name).sign * e.diff > e.margin]
        if watch:
            reason += "; beyond the margin at this look but not yet significant: " + ", ".join(
                f"{e.name} (canary - stable {_fmt(e.diff)}, margin {_fmt(e.margin)})" for e in watch)
        return "advance", reason
    not_ni = [e for e in ev if not (e.tested and e.non_inferior)]
    if not not_ni:
        return "promote", "every metric non-inferior within its margin; gates hold"
    parts = []
    for e in not_ni:
        if not e.tested:
            parts.append(f"{e.name} not testable yet ({e.note})")
        else:
            parts.append(f"{e.name}: z_ni {_fmt(e.z_ni)} < boundary {_fmt(e.b_promotion)} (margin {_fmt(e.margin)})")
    return "extend", "not yet shown non-inferior: " + "; ".join(parts)
