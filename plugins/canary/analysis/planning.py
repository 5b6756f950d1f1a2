"""Power planning: how many canary samples a rollout needs (the spec's ``power_plan`` in preflight).

With equal canary samples ``n`` per step and stable getting the rest of the traffic, the step-stratified
difference (Cochran-Mantel-Haenszel weights ``n_c n_s / (n_c + n_s) = n (1 - p_k)`` at canary share
``p_k``) has variance ``sigma^2 / (n * sum_k (1 - p_k))``. The non-inferiority test at one-sided level
``alpha`` has power ``1 - beta`` at a true difference of 0 when that variance is
``(margin / (z_alpha + z_beta))^2``. ``design_effect`` inflates ``sigma^2`` for per-minute noise
(cluster-robust variances are larger than binomial ones) and ``sequential_inflation`` pays for the
group-sequential boundaries (O'Brien-Fleming-type spending costs a few percent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class SamplePlan:
    """Planned canary samples: ``per_step`` each step, ``total`` over the rollout (the policy's
    ``planned_canary_samples``), and the inputs that produced them."""

    per_step: int
    total: int
    variance: float
    margin_abs: float
    alpha: float
    power: float


def plan_canary_samples(variance: float, margin_abs: float, steps_percent: list[float], alpha: float = 0.05,
                        power: float = 0.8, design_effect: float = 1.3,
                        sequential_inflation: float = 1.1) -> SamplePlan:
    """Canary samples per step so the promotion test has ``power`` when canary equals stable.

    :param variance: per-request variance of the metric on stable (``p (1 - p)`` for a rate).
    :param margin_abs: the non-inferiority margin in metric units (> 0).
    :param steps_percent: the traffic steps, e.g. ``[1, 5, 25, 50]``.
    """
    if margin_abs <= 0:
        raise ValueError(f"margin_abs={margin_abs!r}: planning needs a positive margin (in metric units)")
    if variance <= 0:
        raise ValueError(f"variance={variance!r}: give the metric's per-request variance on stable (> 0)")
    z = stats.norm.isf(alpha) + stats.norm.isf(1 - power)
    denom = sum(1 - p / 100.0 for p in steps_percent)
    n = variance * design_effect * sequential_inflation * z * z / (margin_abs**2 * denom)
    per = int(math.ceil(n))
    return SamplePlan(per, per * len(steps_percent), variance, margin_abs, alpha, power)
