"""Group-sequential boundaries by Lan-DeMets alpha spending (one-sided, upper boundary only).

The z statistic at look k is ``Z_k = S_k / sqrt(t_k)`` where ``S`` is a Brownian motion in information time
``t`` (the information fraction). Given the information fractions of all looks so far and a spending
function ``alpha(t)``, the boundary ``b_k`` is the value with

    P(Z_1 < b_1, ..., Z_{k-1} < b_{k-1}, Z_k >= b_k) = alpha(t_k) - alpha(t_{k-1})

computed by recursive numerical integration of the density of ``S`` on the continuation region
(Armitage, McPherson and Rowe 1969; Jennison and Turnbull 2000, chapter 19). Boundaries only depend on the
information fractions, so they are cached per sequence.

The walk's time and the spending argument are usually the same fraction. They come apart when the data
run past the planned maximum information before the last look: the correlation between looks is still
given by the actual information (``times``, which may exceed 1), while the alpha to spend is a fraction
that must stay below 1 until the final look (``fractions``). Any increasing sequence chosen without
looking at the outcomes keeps the overall level, because each boundary is solved for its own increment
given the boundaries actually used before it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats

_LOWER_SD = 9.0  # the density of S is carried down to -9 standard deviations


def spending(t: float, alpha: float, kind: str = "pocock", gamma: float = -2.0) -> float:
    """Cumulative alpha spent at information fraction ``t`` (clipped to [0, 1]).

    ``pocock``: Lan-DeMets Pocock-type ``alpha * ln(1 + (e - 1) t)``;
    ``obrien_fleming``: Lan-DeMets O'Brien-Fleming-type ``2 - 2 Phi(z_{alpha/2} / sqrt(t))``;
    ``hsd``: Hwang-Shih-DeCani ``alpha (1 - exp(-gamma t)) / (1 - exp(-gamma))`` (gamma = 0: linear).
    """
    t = min(max(float(t), 0.0), 1.0)
    if t <= 0.0:
        return 0.0
    if kind == "pocock":
        return alpha * math.log(1.0 + (math.e - 1.0) * t)
    if kind == "obrien_fleming":
        z = stats.norm.isf(alpha / 2.0)
        return float(2.0 * stats.norm.sf(z / math.sqrt(t)))
    if kind == "hsd":
        if abs(gamma) < 1e-9:
            return alpha * t
        return alpha * (1.0 - math.exp(-gamma * t)) / (1.0 - math.exp(-gamma))
    raise ValueError(f"spending kind={kind!r} is unknown: use pocock, obrien_fleming or hsd")


def _pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


class _Walk:
    """Sub-density of S_k on the continuation region, advanced look by look."""

    def __init__(self) -> None:
        self.t = 0.0
        self.grid: np.ndarray | None = None  # S values
        self.dens: np.ndarray | None = None  # sub-density times quadrature weight

    def cross_prob(self, t: float, b: float) -> float:
        """P(continue so far and Z at fraction t >= b)."""
        if not math.isfinite(b):
            return 0.0
        if self.grid is None:
            return float(special.ndtr(-b))
        sd = math.sqrt(t - self.t)
        return float(np.dot(self.dens, special.ndtr((self.grid - b * math.sqrt(t)) / sd)))

    def advance(self, t: float, b: float) -> None:
        """Condition on Z_t < b and move the density to fraction t."""
        upper = b * math.sqrt(t) if math.isfinite(b) else _LOWER_SD * math.sqrt(t)
        lower = -_LOWER_SD * math.sqrt(t)
        inc = t - self.t
        h = min(0.02 * math.sqrt(t), math.sqrt(inc) / 6.0) if self.grid is not None else 0.02 * math.sqrt(t)
        n = max(int(math.ceil((upper - lower) / h)), 50) | 1  # odd, for Simpson's rule
        grid = np.linspace(lower, upper, n)
        w = np.ones(n)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        w *= (grid[1] - grid[0]) / 3.0
        if self.grid is None:
            dens = _pdf(grid / math.sqrt(t)) / math.sqrt(t)
        else:
            sd = math.sqrt(inc)
            dens = np.empty(n)
            for lo in range(0, n, 512):  # chunks keep the kernel matrix small
                k = _pdf((grid[lo : lo + 512, None] - self.grid[None, :]) / sd) / sd
                dens[lo : lo + 512] = k @ self.dens
        self.t, self.grid, self.dens = t, grid, dens * w


def _round3(t: float, hi: float = 1.0) -> float:
    """Three significant digits, clipped to ``[1e-4, hi]``."""
    t = min(max(float(t), 1e-4), hi)
    return round(t, 2 - int(math.floor(math.log10(t))))


def _rounded_increasing(values: tuple[float, ...] | list[float], hi: float = 1.0) -> tuple[float, ...]:
    """Rounded values (:func:`_round3`) that stay strictly increasing where the raw values increase: two
    looks 0.3412 and 0.3414 must not become one look (the second would get an infinite boundary)."""
    out: list[float] = []
    for i, v in enumerate(values):
        r = _round3(v, hi)
        if out and r <= out[-1] and float(v) > float(values[i - 1]):
            r = min(hi, out[-1] + 10.0 ** (math.floor(math.log10(out[-1])) - 2))
        out.append(r)
    return tuple(out)


@lru_cache(maxsize=65536)
def _bounds_cached(fractions: tuple[float, ...], times: tuple[float, ...], alpha: float, kind: str,
                   gamma: float) -> tuple[float, ...]:
    walk = _Walk()
    out: list[float] = []
    spent = 0.0
    for s, t in zip(fractions, times, strict=True):
        if t <= walk.t + 1e-9:  # no new information: nothing new to spend
            out.append(math.inf)
            continue
        target = spending(s, alpha, kind, gamma) - spent
        if target <= 1e-12:
            b = math.inf
        else:
            def f(b: float, t: float = t, target: float = target) -> float:
                return walk.cross_prob(t, b) - target

            if f(12.0) > 0:
                b = math.inf
            elif f(-3.0) <= 0:
                b = -3.0
            else:
                b = optimize.brentq(f, -3.0, 12.0, xtol=1e-7)
        spent += walk.cross_prob(t, b)
        out.append(b)
        walk.advance(t, b)
    return tuple(out)


def boundaries(fractions: list[float] | tuple[float, ...], alpha: float, kind: str = "pocock",
               gamma: float = -2.0, times: list[float] | tuple[float, ...] | None = None) -> list[float]:
    """Upper z boundaries for looks at the given information fractions (increasing, in (0, 1]).

    ``times``: the looks' actual information on the same scale (increasing; may exceed 1 when the data ran
    past the plan); default the fractions themselves. The boundary at look k spends
    ``spending(fractions[k]) - spending(fractions[k-1])`` with the looks correlated as ``times`` say.

    Values are rounded to three significant digits (0.01234 -> 0.0123) so that re-runs and nearby sequences
    share the cache, and kept strictly increasing where the raw values increase; the spending at a rounded
    fraction differs from the exact one by a fraction of a percent of that look's increment. A look that
    adds no information gets an infinite boundary (it cannot reject).
    """
    fr = _rounded_increasing(tuple(fractions))
    tm = fr if times is None else _rounded_increasing(tuple(times), hi=1e6)
    if len(tm) != len(fr):
        raise ValueError(f"times has {len(tm)} looks and fractions {len(fr)}: give one time per look")
    return list(_bounds_cached(fr, tm, float(alpha), kind, float(gamma)))


def crossing_probability(bounds: list[float], fractions: list[float], drift: float = 0.0) -> float:
    """P(Z_k >= b_k at some look) for a Brownian motion with the given drift (Z_k has mean drift*sqrt(t_k)).

    Used by the tests (published constants) and by power planning.
    """
    walk = _Walk()
    total = 0.0
    for b, t in zip(bounds, fractions, strict=True):
        bb = b - drift * math.sqrt(t)  # shift to the null walk: S - drift * t
        total += walk.cross_prob(t, bb)
        walk.advance(t, bb)
    return total


def constant_boundary(k: int, alpha: float, shape: str = "pocock") -> float:
    """The classical constant C with boundaries ``C`` (Pocock) or ``C sqrt(K/k)`` (O'Brien-Fleming) at K
    equally spaced looks and one-sided level ``alpha`` (Jennison and Turnbull, tables 2.1 and 2.3 list the
    two-sided 2*alpha versions)."""
    fr = [(i + 1) / k for i in range(k)]

    def f(c: float) -> float:
        bs = [c if shape == "pocock" else c * math.sqrt(k / (i + 1)) for i in range(k)]
        return crossing_probability(bs, fr) - alpha

    return float(optimize.brentq(f, 1.0, 6.0, xtol=1e-6))
