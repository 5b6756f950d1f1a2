"""Gates that make the data untrustworthy, and the always-valid circuit breaker.

* Sample ratio mismatch (SRM): Pearson chi-square of the canary/stable counts per step against the step's
  configured percent (df = number of steps). Counts are distinct units when unit ids are logged (routing is
  by unit), requests otherwise.
* Labelled share: for label metrics, the share of eligible predictions that got a label must not differ
  between arms (2x2 chi-square), or the label metric compares different populations.
* Circuit breaker: a mixture sequential probability ratio test (mSPRT, Johari et al. 2017; Robbins 1970) on
  the difference of means with a normal mixing distribution N(0, tau^2). Its type-I error is at most
  ``alpha`` however often it is evaluated, so the hold sensor may call it between looks.
"""

from __future__ import annotations

import math
from typing import Any

from scipy import stats


def srm_test(traffic: list[dict[str, Any]], alpha: float,
             expected_share: tuple[float, ...] | list[float] = ()) -> dict[str, Any]:
    """Sample ratio mismatch over steps. ``traffic`` rows: ``step``, ``arm``, ``requests``, ``units``,
    ``percent`` (canary percent of the step). ``expected_share[step]`` overrides the percent.

    Returns ``{"p_value", "chi2", "df", "mismatch", "alpha", "steps": [...]}``; ``p_value`` is None when
    no step has a known expected share.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for row in traffic:
        s = by_step.setdefault(int(row["step"]), {"stable": 0, "canary": 0, "percent": None, "units": True})
        if row["arm"] in ("stable", "canary"):
            s[row["arm"] + "_requests"] = int(row.get("requests") or 0)
            s[row["arm"] + "_units"] = int(row.get("units") or 0)
        if row.get("percent") is not None:
            s["percent"] = float(row["percent"])
    chi2, df, out = 0.0, 0, []
    for step in sorted(by_step):
        s = by_step[step]
        share = expected_share[step] if step < len(expected_share) else (
            s["percent"] / 100.0 if s["percent"] is not None else None)
        use_units = s.get("stable_units", 0) > 0 and s.get("canary_units", 0) > 0
        key = "units" if use_units else "requests"
        nb, nc = s.get(f"stable_{key}", 0), s.get(f"canary_{key}", 0)
        row = {"step": step, "counted": key, "stable": nb, "canary": nc, "expected_canary_share": share}
        n = nb + nc
        if share is not None and 0 < share < 1 and n > 0:
            ec, eb = n * share, n * (1 - share)
            row["observed_canary_share"] = nc / n
            chi2 += (nc - ec) ** 2 / ec + (nb - eb) ** 2 / eb
            df += 1
        out.append(row)
    p = float(stats.chi2.sf(chi2, df)) if df else None
    return {"p_value": p, "chi2": chi2, "df": df, "alpha": alpha, "mismatch": p is not None and p < alpha,
            "steps": out}


def labelled_share_test(labels: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Compare the labelled share of eligible predictions between arms.

    ``labels``: ``{"stable": {"eligible", "labelled"}, "canary": {...}}`` and optionally ``"steps"``: the
    same per step (``[{"step", "stable": {...}, "canary": {...}}]``). With steps the test is
    Cochran-Mantel-Haenszel across steps: labels keep arriving, so older predictions have a higher
    labelled share, and the canary's rows are younger on average during a ramp; comparing within steps
    (where both arms span the same times) removes that. Without steps: Pearson 2x2 chi-square.
    """
    eb, lb = labels.get("stable", {}).get("eligible", 0), labels.get("stable", {}).get("labelled", 0)
    ec, lc = labels.get("canary", {}).get("eligible", 0), labels.get("canary", {}).get("labelled", 0)
    res: dict[str, Any] = {"stable_share": lb / eb if eb else None, "canary_share": lc / ec if ec else None,
                           "eligible": {"stable": eb, "canary": ec}, "p_value": None, "mismatch": False}
    steps = labels.get("steps")
    if steps:
        dev, var = 0.0, 0.0
        for st in steps:
            nb, xb = st["stable"]["eligible"], st["stable"]["labelled"]
            nc, xc = st["canary"]["eligible"], st["canary"]["labelled"]
            n, x = nb + nc, xb + xc
            if nb == 0 or nc == 0 or n < 2 or x == 0 or x == n:
                continue
            dev += xc - nc * x / n
            var += nb * nc * x * (n - x) / (n * n * (n - 1))
        if var > 0:
            res["method"] = "cmh"
            res["p_value"] = float(stats.chi2.sf(dev * dev / var, 1))
            res["mismatch"] = res["p_value"] < alpha
        return res
    tot_l, tot = lb + lc, eb + ec
    if eb and ec and 0 < tot_l < tot:
        chi2 = 0.0
        for e, lab in ((eb, lb), (ec, lc)):
            for obs, frac in ((lab, tot_l / tot), (e - lab, 1 - tot_l / tot)):
                exp = e * frac
                chi2 += (obs - exp) ** 2 / exp
        res["method"] = "pearson"
        res["p_value"] = float(stats.chi2.sf(chi2, 1))
        res["mismatch"] = res["p_value"] < alpha
    return res


def msprt_log_lr(diff: float, var: float, tau: float) -> float:
    """Log of the mSPRT mixture likelihood ratio for an estimate ``diff`` with variance ``var`` under
    H0: true difference 0, mixing over N(0, tau^2):
    ``0.5 log(var / (var + tau^2)) + tau^2 diff^2 / (2 var (var + tau^2))``."""
    if var <= 0 or tau <= 0:
        return 0.0
    t2 = tau * tau
    return 0.5 * math.log(var / (var + t2)) + t2 * diff * diff / (2.0 * var * (var + t2))


def circuit_breaker(harm_diff: float, var: float, tau: float, alpha: float) -> dict[str, Any]:
    """Trip when the canary is worse (``harm_diff > 0``, harm direction already applied) and the mixture
    likelihood ratio exceeds ``1 / alpha``."""
    llr = msprt_log_lr(harm_diff, var, tau)
    thr = math.log(1.0 / alpha)
    return {"tripped": bool(harm_diff > 0 and llr >= thr), "log_lr": llr, "threshold": thr, "tau": tau,
            "alpha": alpha}


def circuit_breaker_counts(stable_n: int, stable_bad: int, canary_n: int, canary_bad: int, alpha: float,
                           tau_rel: float = 1.0) -> dict[str, Any]:
    """Cheap breaker on per-arm counts of a binary harm (e.g. errors) for the hold sensor.

    ``tau_rel`` scales the mixing spread to stable's rate (1.0: tuned to a doubling of the rate).
    """
    if stable_n <= 0 or canary_n <= 0:
        return {"tripped": False, "log_lr": 0.0, "threshold": math.log(1 / alpha), "tau": 0.0, "alpha": alpha}
    pb, pc = stable_bad / stable_n, canary_bad / canary_n
    pool = (stable_bad + canary_bad) / (stable_n + canary_n)
    pool = min(max(pool, 0.5 / (stable_n + canary_n)), 1 - 0.5 / (stable_n + canary_n))
    var = pool * (1 - pool) * (1 / stable_n + 1 / canary_n)
    tau = tau_rel * max(pb, 1.0 / stable_n)
    return circuit_breaker(pc - pb, var, tau, alpha)
