"""Decision quality of the judge against three peers, by simulation (issue 4, "Must show").

Run:  PYTHONPATH=include:plugins .venv/bin/python benchmarks/decision_quality.py [--reps 2000] [--quick]

Every rollout is simulated at the level of sufficient statistics: per minute and arm, the request count and
the count of bad outcomes (errors, latency above stable's pre-rollout p95, wrong predictions). Per-minute noise
multiplies each arm's rate by ``exp(eps - s^2/2)``, ``eps ~ N(0, s^2)``, s = 0.15: independent between the
arms (they run on different replicas), or, in the ``shared`` scenarios, the same draw for both arms (one
load or traffic-mix swing hits both). The ramp is 1 -> 5 -> 25 -> 50 %; each step holds until
the planned canary samples of the step are reached (power plan: ``canary.analysis.planning``), at least
5 minutes, and the look is taken at the end of the step. Two metrics per rollout: a critical rate (error
rate, margin 10 % relative) and the latency exceedance share (stable's p95, so 5 % on stable; margin 0.01
absolute, not critical).

Judges, on the same simulated data:
* ``judge``: ``canary.analysis.judge`` (stratified, cluster-robust, group-sequential, SRM, breaker).
* ``z_every_look``: pooled two-proportion z-test at every look at alpha / #metrics (no look correction),
  non-inferiority by a plain z-test at the last look.
* ``fixed_horizon``: the judge's estimator (stratified, cluster-robust), one test at the end only.
* ``kayenta``: per step interval, Mann-Whitney U on per-minute rates, 98 % confidence, a metric fails when
  significant and worse; score = % metrics passing; score < 75 rolls back; promotion needs >= 95.

Outcomes: rollback (harm shown), promote, inconclusive (at the last look neither; the spec's on_inconclusive
decides), rollback at the first look, and bad outcomes served by the canary on the harmed metric until the
decision (the whole rollout when nothing is decided before the end).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from canary.analysis import LookHistory, MetricPolicy, Policy, judge
from canary.analysis.planning import plan_canary_samples
from canary.analysis.stats import ArmStats, MetricCells, compare
from scipy import stats

STEPS = (1.0, 5.0, 25.0, 50.0)
NOISE = 0.15
LAT_BASE = 0.05
ALPHA = 0.05


@dataclass(frozen=True)
class Scenario:
    """One cell: base rate and relative harm of the critical rate, canary latency exceedance, hold mode."""

    name: str
    base: float
    harm: float = 0.0  # relative harm on the critical rate
    lat_canary: float = LAT_BASE  # canary's share above stable's p95
    traffic: int = 20000  # requests per minute
    hold: str = "samples"  # or "time" (60 minutes per step)
    drift: bool = False  # base rate and traffic drift over the day
    label_delay: int = 0  # minutes; the critical metric is then a label metric
    label_share: float = 0.8
    shared_noise: bool = False  # the per-minute noise hits both arms alike (same load, same traffic mix)
    tags: tuple[str, ...] = field(default_factory=tuple)


def scenarios() -> list[Scenario]:
    out = [Scenario("A/A 0.5%", 0.005, tags=("aa",)), Scenario("A/A 5%", 0.05, traffic=2000, tags=("aa",))]
    for base, tr in ((0.005, 20000), (0.05, 2000)):
        for h in (0.05, 0.10, 0.20, 0.50, 1.00):
            tags = ("margin",) if h == 0.10 else ("p20",) if h == 0.20 else ("p100",) if h == 1.0 else ()
            out.append(Scenario(f"+{h:.0%} at {base:.1%}", base, harm=h, traffic=tr, tags=tags))
    lat_reg = float(stats.norm.sf(stats.norm.isf(LAT_BASE) - math.log(1.1) / 0.5))  # lognormal s=0.5, x1.1
    out.append(Scenario("latency x1.1", 0.05, lat_canary=lat_reg, traffic=2000))
    out.append(Scenario("latency at margin", 0.05, lat_canary=LAT_BASE + 0.01, traffic=2000, tags=("margin_lat",)))
    out.append(Scenario("ramp+drift A/A", 0.05, traffic=2000, hold="time", drift=True, tags=("aa",)))
    out.append(Scenario("ramp+drift +20%", 0.05, harm=0.2, traffic=2000, hold="time", drift=True, tags=("p20",)))
    out.append(Scenario("label delay A/A", 0.05, traffic=2000, label_delay=30, tags=("aa",)))
    out.append(Scenario("label delay +20%", 0.05, harm=0.2, traffic=2000, label_delay=30, tags=("p20",)))
    out.append(Scenario("shared load A/A", 0.05, traffic=2000, shared_noise=True, tags=("aa",)))
    out.append(Scenario("shared lat. margin", 0.05, lat_canary=LAT_BASE + 0.01, traffic=2000, shared_noise=True,
                        tags=("margin_lat",)))
    out.append(Scenario("shared +20%", 0.05, harm=0.2, traffic=2000, shared_noise=True, tags=("p20",)))
    return out


def make_policy(sc: Scenario, planned: int) -> Policy:
    src = "mismatch" if sc.label_delay else "error"
    return Policy(
        metrics=(
            MetricPolicy("error_rate" if not sc.label_delay else "mistake_rate", src, "binary", "decrease", 0.10,
                         "relative", critical=True, label_delay_s=60.0 * sc.label_delay),
            MetricPolicy("latency_p95_exceed", "latency_ms", "latency_threshold", "decrease", 0.01, "absolute",
                         threshold=100.0),
        ),
        alpha_rollback=ALPHA, alpha_promotion=ALPHA, planned_canary_samples=planned,
        expected_canary_share=tuple(p / 100 for p in STEPS),
    )


@dataclass
class Sim:
    """Simulated minutes for all replications of one scenario (arrays shaped (reps, minutes))."""

    step: np.ndarray  # (M,) step index of each minute
    ends: list[int]  # minute index where each step's look happens (exclusive)
    n: dict[str, np.ndarray]  # arm -> requests
    lab_n: dict[str, np.ndarray]  # arm -> labelled requests (== n without label delay)
    bad: dict[str, np.ndarray]  # arm -> critical-metric bad outcomes (among labelled)
    lat: dict[str, np.ndarray]  # arm -> latency exceedances
    planned: int


def simulate(sc: Scenario, reps: int, rng: np.random.Generator) -> Sim:
    plan = plan_canary_samples(sc.base * (1 - sc.base), 0.10 * sc.base, list(STEPS), ALPHA, 0.8)
    if sc.hold == "samples":
        share_lab = sc.label_share if sc.label_delay else 1.0
        dur = [max(5, math.ceil(plan.per_step / share_lab / (sc.traffic * p / 100))) for p in STEPS]
        if sc.label_delay:
            dur = [d + sc.label_delay if i == 0 else d for i, d in enumerate(dur)]
    else:
        dur = [60] * len(STEPS)
    step = np.concatenate([np.full(d, i) for i, d in enumerate(dur)])
    ends = list(np.cumsum(dur))
    M = len(step)
    share = np.array(STEPS)[step] / 100.0
    frac = np.arange(M) / M
    traffic = np.full(M, float(sc.traffic))
    base = np.full(M, sc.base)
    if sc.drift:  # the rate climbs from 0.6x to 1.4x over the rollout while the canary share ramps up
        base = sc.base * (0.6 + 0.8 * frac)
        traffic = sc.traffic * (1.3 - 0.6 * frac)
    tr = rng.poisson(np.broadcast_to(traffic, (reps, M)))
    nc = rng.binomial(tr, share)
    n = {"stable": tr - nc, "canary": nc}

    shared: list[np.ndarray] = []

    def rate(p: np.ndarray, arm: str) -> np.ndarray:
        # independent noise: a draw per arm; shared noise: stable's draw is the canary's too
        eps = shared.pop() if sc.shared_noise and arm == "canary" else rng.normal(0.0, NOISE, (reps, M))
        if sc.shared_noise and arm == "stable":
            shared.append(eps)
        return np.clip(p * np.exp(eps - NOISE**2 / 2), 0.0, 1.0)

    lab_n = {a: rng.binomial(n[a], sc.label_share) if sc.label_delay else n[a] for a in n}
    bad = {"stable": rng.binomial(lab_n["stable"], rate(base, "stable")),
           "canary": rng.binomial(lab_n["canary"], rate(base * (1 + sc.harm), "canary"))}
    lat = {"stable": rng.binomial(n["stable"], rate(np.full(M, LAT_BASE), "stable")),
           "canary": rng.binomial(n["canary"], rate(np.full(M, sc.lat_canary), "canary"))}
    planned = int(round(plan.total)) if sc.hold == "samples" else int(
        round(sum(d * sc.traffic * p / 100 for d, p in zip(dur, STEPS, strict=True))))
    if sc.label_delay:
        planned = int(plan.total)
    return Sim(step, ends, n, lab_n, bad, lat, planned)


def _cells(sim: Sim, r: int, upto: int, which: str) -> MetricCells:
    src = sim.bad if which == "bad" else sim.lat
    nn = sim.lab_n if which == "bad" else sim.n
    k = upto
    t = np.arange(k)
    return MetricCells.from_arrays(
        np.concatenate([np.zeros(k, bool), np.ones(k, bool)]), np.concatenate([sim.step[:k], sim.step[:k]]),
        np.concatenate([t, t]), np.concatenate([nn["stable"][r, :k], nn["canary"][r, :k]]),
        np.concatenate([src["stable"][r, :k], src["canary"][r, :k]]),
        np.concatenate([src["stable"][r, :k], src["canary"][r, :k]]))


def _stats(sim: Sim, sc: Scenario, policy: Policy, r: int, look_end: int) -> ArmStats:
    lab_end = max(look_end - sc.label_delay, 0) if sc.label_delay else look_end
    names = [m.name for m in policy.metrics]
    traffic = []
    for s in range(sim.step[look_end - 1] + 1):
        mask = sim.step[:look_end] == s
        for arm in ("stable", "canary"):
            traffic.append({"step": s, "arm": arm, "requests": int(sim.n[arm][r, :look_end][mask].sum()),
                            "units": 0, "percent": STEPS[s]})
    labels = {}
    if sc.label_delay:
        lab: dict = {arm: {"eligible": int(sim.n[arm][r, :lab_end].sum()),
                           "labelled": int(sim.lab_n[arm][r, :lab_end].sum())} for arm in ("stable", "canary")}
        lab["steps"] = []
        for s in range(sim.step[look_end - 1] + 1):
            mask = sim.step[:lab_end] == s
            lab["steps"].append({"step": s, **{arm: {"eligible": int(sim.n[arm][r, :lab_end][mask].sum()),
                                                     "labelled": int(sim.lab_n[arm][r, :lab_end][mask].sum())}
                                               for arm in ("stable", "canary")}})
        labels[names[0]] = lab
    return ArmStats(metrics={names[0]: _cells(sim, r, lab_end, "bad"), names[1]: _cells(sim, r, look_end, "lat")},
                    traffic=traffic, labels=labels)


def run_judge(sim: Sim, sc: Scenario, policy: Policy, reps: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(reps, dtype=int) for k in ("decision", "look")}  # decision 0 incon., 1 rollback, 2 promote
    extends = 0
    for r in range(reps):
        hist = LookHistory()
        out["look"][r] = len(sim.ends) - 1
        for k, end in enumerate(sim.ends):
            last = k == len(sim.ends) - 1
            v = judge(_stats(sim, sc, policy, r, end), policy, hist, is_last_step=last)
            hist = v.history
            if v.decision == "rollback":
                out["decision"][r], out["look"][r] = 1, k
                break
            if v.decision == "promote":
                out["decision"][r] = 2
                break
            extends += v.decision == "extend" and not last
    out["extends"] = np.array([extends])
    return out


def _pooled_z(xc, nc, xb, nb):
    pc, pb = xc / np.maximum(nc, 1), xb / np.maximum(nb, 1)
    p = (xc + xb) / np.maximum(nc + nb, 1)
    se = np.sqrt(np.maximum(p * (1 - p) * (1 / np.maximum(nc, 1) + 1 / np.maximum(nb, 1)), 1e-300))
    return (pc - pb) / se, pc, pb


def run_z_every_look(sim: Sim, sc: Scenario, policy: Policy, reps: int) -> dict[str, np.ndarray]:
    zc = stats.norm.isf(ALPHA / len(policy.metrics))
    dec, look = np.zeros(reps, int), np.full(reps, len(sim.ends) - 1)
    done = np.zeros(reps, bool)
    for k, end in enumerate(sim.ends):
        lab_end = max(end - sc.label_delay, 0) if sc.label_delay else end
        hit = np.zeros(reps, bool)
        ni_all = np.ones(reps, bool)
        for which, e in (("bad", lab_end), ("lat", end)):
            src, nn = (sim.bad, sim.lab_n) if which == "bad" else (sim.lat, sim.n)
            xc, xb = src["canary"][:, :e].sum(1), src["stable"][:, :e].sum(1)
            nc, nb = nn["canary"][:, :e].sum(1), nn["stable"][:, :e].sum(1)
            z, pc, pb = _pooled_z(xc, nc, xb, nb)
            hit |= z > zc
            margin = 0.10 * pb if which == "bad" else 0.01
            se = np.sqrt(pc * (1 - pc) / np.maximum(nc, 1) + pb * (1 - pb) / np.maximum(nb, 1))
            ni_all &= (margin - (pc - pb)) / np.maximum(se, 1e-300) > stats.norm.isf(ALPHA)
        new = hit & ~done
        dec[new], look[new] = 1, k
        done |= hit
        if k == len(sim.ends) - 1:
            dec[~done & ni_all] = 2
    return {"decision": dec, "look": look}


def run_fixed(sim: Sim, sc: Scenario, policy: Policy, reps: int) -> dict[str, np.ndarray]:
    zc = stats.norm.isf(ALPHA / len(policy.metrics))
    zp = stats.norm.isf(ALPHA)
    dec = np.zeros(reps, int)
    end = sim.ends[-1]
    for r in range(reps):
        st = _stats(sim, sc, policy, r, end)
        cs = [compare(st.metrics[m.name], m) for m in policy.metrics]
        if any(c.z_harm > zc for c in cs):
            dec[r] = 1
        elif all(c.z_ni > zp for c in cs):
            dec[r] = 2
    return {"decision": dec, "look": np.full(reps, len(sim.ends) - 1)}


def run_kayenta(sim: Sim, sc: Scenario, policy: Policy, reps: int) -> dict[str, np.ndarray]:
    dec, look = np.zeros(reps, int), np.full(reps, len(sim.ends) - 1)
    done = np.zeros(reps, bool)
    start = 0
    for k, end in enumerate(sim.ends):
        lab_end = max(end - sc.label_delay, 0) if sc.label_delay else end
        passed = np.zeros(reps)
        for which, e in (("bad", lab_end), ("lat", end)):
            src, nn = (sim.bad, sim.lab_n) if which == "bad" else (sim.lat, sim.n)
            lo = min(start, e)
            if e - lo < 3:
                passed += 1
                continue
            rc = src["canary"][:, lo:e] / np.maximum(nn["canary"][:, lo:e], 1)
            rb = src["stable"][:, lo:e] / np.maximum(nn["stable"][:, lo:e], 1)
            p = stats.mannwhitneyu(rc, rb, alternative="two-sided", axis=1).pvalue
            worse = np.median(rc, 1) > np.median(rb, 1)
            worse |= rc.mean(1) > rb.mean(1)
            passed += ~((p < 0.02) & worse)
        score = 100 * passed / len(policy.metrics)
        fail = (score < 75) & ~done
        dec[fail], look[fail] = 1, k
        done |= fail
        if k == len(sim.ends) - 1:
            dec[~done & (score >= 95)] = 2
            dec[~done & (score < 95)] = 1
        start = end
    return {"decision": dec, "look": look}


METHODS = {"judge": run_judge, "z_every_look": run_z_every_look, "fixed_horizon": run_fixed,
           "kayenta": run_kayenta}


def served_bad(sim: Sim, res: dict[str, np.ndarray], method: str, sc: Scenario) -> np.ndarray:
    """Canary's bad outcomes on the harmed metric until the decision."""
    src = sim.lat if sc.lat_canary != LAT_BASE else sim.bad
    cum = np.cumsum(src["canary"], axis=1)
    if method == "fixed_horizon":
        return cum[:, -1].astype(float)
    stop = np.array(sim.ends)[res["look"]]
    stop = np.where(res["decision"] == 1, stop, sim.ends[-1])
    return cum[np.arange(len(stop)), stop - 1].astype(float)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="replications per cell (default 2000)")
    ap.add_argument("--quick", action="store_true", help="200 replications, for a smoke run")
    ap.add_argument("--seed", type=int, default=20260)
    ap.add_argument("--only", default="", help="run only scenarios whose name contains this text")
    args = ap.parse_args(argv)
    reps = 200 if args.quick else args.reps
    t0 = time.time()
    rows = []
    print(f"decision quality: {reps} replications per cell, seed {args.seed}, steps {STEPS}, noise s={NOISE}")
    hdr = (f"{'scenario':<18} {'method':<14} {'rollback':>8} {'promote':>8} {'inconcl':>8} {'rb@look1':>8} "
           f"{'bad served':>11} {'vs fixed':>8}")
    print(hdr)
    print("-" * len(hdr))
    for i, sc in enumerate(scenarios()):
        if args.only and args.only not in sc.name:
            continue
        rng = np.random.default_rng(args.seed + 1000 * i)
        sim = simulate(sc, reps, rng)
        policy = make_policy(sc, sim.planned)
        res = {m: f(sim, sc, policy, reps) for m, f in METHODS.items()}
        bad = {m: served_bad(sim, res[m], m, sc).mean() for m in METHODS}
        for m in METHODS:
            d = res[m]["decision"]
            row = {"scenario": sc.name, "tags": sc.tags, "method": m, "rollback": float((d == 1).mean()),
                   "promote": float((d == 2).mean()), "inconclusive": float((d == 0).mean()),
                   "rb_first": float(((d == 1) & (res[m]["look"] == 0)).mean()), "bad": float(bad[m]),
                   "bad_ratio": float(bad[m] / bad["fixed_horizon"]) if bad["fixed_horizon"] else float("nan")}
            rows.append(row)
            print(f"{sc.name:<18} {m:<14} {row['rollback']:>8.3f} {row['promote']:>8.3f} {row['inconclusive']:>8.3f} "
                  f"{row['rb_first']:>8.3f} {row['bad']:>11.1f} {row['bad_ratio']:>8.2f}")
        ext = int(res["judge"]["extends"][0])
        if ext:
            print(f"{'':<18} (judge extended {ext} intermediate looks; the simulation moves on)")
        sys.stdout.flush()
    print(f"\nelapsed {time.time() - t0:.0f} s")
    return check_targets(rows)


def check_targets(rows: list[dict]) -> int:
    """Print each target of the issue with the measured numbers; exit code 1 when one is missed."""
    def get(method: str, tag: str) -> list[dict]:
        return [r for r in rows if r["method"] == method and tag in r["tags"]]

    ok = True
    print("\ntargets (judge):")
    checks = []
    for r in get("judge", "aa"):
        checks.append((f"A/A false rollback <= 5.5% [{r['scenario']}]", r["rollback"], r["rollback"] <= 0.055))
    for tag in ("margin", "margin_lat"):
        for r in get("judge", tag):
            checks.append((f"false promotion at harm = margin <= 5.5% [{r['scenario']}]", r["promote"],
                           r["promote"] <= 0.055))
    fixed = {r["scenario"]: r for r in get("fixed_horizon", "p20")}
    for r in get("judge", "p20"):
        f = fixed[r["scenario"]]
        ratio = r["rollback"] / f["rollback"] if f["rollback"] else float("nan")
        checks.append((f"power at +20% >= 0.95x fixed [{r['scenario']}] ({r['rollback']:.3f} vs {f['rollback']:.3f})",
                       ratio, ratio >= 0.95))
        checks.append((f"bad outcomes at +20% <= 0.65x fixed [{r['scenario']}]", r["bad_ratio"],
                       r["bad_ratio"] <= 0.65))
    for r in get("judge", "p100"):
        checks.append((f"+100% rolled back at look 1 >= 90% [{r['scenario']}]", r["rb_first"], r["rb_first"] >= 0.90))
    for name, val, good in checks:
        ok &= good
        print(f"  {'PASS' if good else 'MISS'}  {name}: {val:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
