"""Pre-flight warns (and runs on) when the schedule cannot give a metric the samples its promotion test needs,
or when a relative margin sits on a base rate of 0: README's "refuses a rollout whose power plan cannot finish
in time" covers durations; these are the sample counts. Real functions, no mocks."""

from __future__ import annotations

import logging

from canary import runtime
from canary.hooks.router import TrafficRouterHook


def _spec(**changes):
    plan = runtime.validate("include/rollouts/fraud.yaml", {"candidate": "v2"}, None, "manual", "test-run")
    spec = plan["spec"]
    spec.update(changes)
    return spec


def _baseline(rate, labelled_share, base_rates):
    """A baseline as ``_baseline`` records it (variances are recomputed as p(1-p) for rates)."""
    return {"rate_per_s": rate, "labelled_share": labelled_share, "sampled": 5000, "requests": 100_000,
            "latency_p95_ms": 20.0, "base_rates": dict(base_rates),
            "variances": {k: v * (1 - v) for k, v in base_rates.items()}}


def test_tight_relative_margin_at_low_traffic_warns_with_needed_and_exposed_samples():
    # The trial: mistake_rate (mismatch) within 10 % relative of ~8 %, 30 req/s, short holds.
    spec = _spec(hold={"min_duration": 60.0, "min_samples": 100, "max_wait": 300.0, "poll_interval": 30.0},
                 steps=[1, 5, 25, 50])
    baseline = _baseline(30.0, 0.5, {"error_rate": 0.01, "latency_p95_exceed": 0.05, "mistake_rate": 0.08})
    pp = runtime.power_plan(spec, baseline)
    assert pp["fits_deadline"]  # the durations fit; only the sample count cannot
    warnings = runtime.power_warnings(spec, baseline, pp)
    by_metric = {w["metric"]: w for w in warnings}
    assert set(by_metric) == {"mistake_rate", "error_rate"}
    w = by_metric["mistake_rate"]
    need = pp["promotion_samples"]["mistake_rate"]["total"]
    exposed = int(30.0 * (0.01 + 0.05 + 0.25 + 0.5) * 300.0 * 0.5)  # rate x shares x max_wait x labelled share
    assert w["problem"] == "underpowered"
    assert w["samples_needed"] == need and w["samples_exposed"] == exposed and exposed < need
    assert f"~{need} labelled canary samples" in w["message"] and f"at most ~{exposed}" in w["message"]
    for fix in ("wider margin for mistake_rate", "longer hold.max_wait", "fewer, larger steps"):
        assert fix in w["message"]
    # latency_p95_exceed (absolute 0.02 at 5 %) is reachable with the same schedule: no warning for it.
    assert pp["promotion_samples"]["latency_p95_exceed"]["total"] <= int(30.0 * 0.81 * 300.0)

    # The fixes the message names make the warning go away: a wider margin, or holds long enough.
    wide = _spec(hold=spec["hold"], metrics=[{**m, "margin": 1.0} if m["name"] == "mistake_rate" else m
                                             for m in spec["metrics"]])
    left = runtime.power_warnings(wide, baseline, runtime.power_plan(wide, baseline))
    assert [w["metric"] for w in left] == ["error_rate"]
    long = _spec(hold={**spec["hold"], "max_wait": 86400.0}, deadline=10 * 86400.0)
    assert runtime.power_warnings(long, baseline, runtime.power_plan(long, baseline)) == []


def test_relative_margin_on_a_zero_base_rate_warns_and_suggests_an_absolute_margin():
    spec = _spec(metrics=[{**m, "margin": 0.5, "margin_type": "relative"} if m["name"] == "error_rate" else m
                          for m in _spec()["metrics"]])
    baseline = _baseline(200.0, 0.9, {"error_rate": 0.0, "latency_p95_exceed": 0.05, "mistake_rate": 0.08})
    pp = runtime.power_plan(spec, baseline)
    warnings = runtime.power_warnings(spec, baseline, pp)
    assert [(w["metric"], w["problem"]) for w in warnings] == [("error_rate", "zero_base_rate")]
    msg = warnings[0]["message"]
    assert "base rate in the reference window is 0" in msg and "margin is 0" in msg
    assert "margin_type: absolute" in msg
    # The same metric with an absolute margin (as fraud.yaml has it) is fine at this traffic.
    assert runtime.power_warnings(_spec(), baseline, runtime.power_plan(_spec(), baseline)) == []


def test_preflight_logs_the_warnings_records_them_and_still_runs(router_conn, set_conn, tmp_path, gateway, caplog):
    import requests

    set_conn("canary_test_log", conn_type="sqlite", host=str(tmp_path / "log.db"))
    s = requests.Session()
    for i in range(runtime.BASELINE_MIN_REQUESTS):
        feats = {"amount": 40.0 + i % 7, "hour": 13.0, "account_age_days": 300.0, "tx_last_24h": 2.0,
                 "merchant_risk": 0.2, "country": 1.0, "distance_km": 5.0}
        s.post(f"{gateway.url}/v1/models/fraud/predict", json={"unit_id": f"u{i}", "features": feats},
               timeout=10).raise_for_status()
    plan = runtime.validate("include/rollouts/fraud.yaml", {"candidate": "v2"}, None, "manual", "test-run")
    spec = plan["spec"]
    spec["connections"] = {"router": router_conn, "prediction_log": "canary_test_log"}
    # error_rate: relative margin on the gateway's error rate of 0; latency: a margin no schedule here can show.
    spec["metrics"] = [{**m, "margin": 0.5, "margin_type": "relative"} if m["name"] == "error_rate" else
                       {**m, "margin": 0.0005} if m["name"] == "latency_p95_exceed" else m
                       for m in spec["metrics"]]
    before = TrafficRouterHook(router_conn).get_route("fraud")
    with caplog.at_level(logging.WARNING, logger="canary.runtime"):
        pre = runtime.preflight(plan)
    assert pre["baseline"]["base_rates"]["error_rate"] == 0.0
    problems = {w["metric"]: w["problem"] for w in pre["power_warnings"]}
    assert problems == {"error_rate": "zero_base_rate", "latency_p95_exceed": "underpowered"}
    assert pre["power_plan"]["power_warnings"] == pre["power_warnings"]  # the report reads the power plan
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("metric latency_p95_exceed: the promotion test needs" in m for m in logged)
    assert any("metric error_rate: margin 0.5 is relative" in m for m in logged)
    assert TrafficRouterHook(router_conn).get_route("fraud") == before  # pre-flight moves no traffic
