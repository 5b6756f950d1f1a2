"""Contract 1 against the real gateway on loopback (SQLite and PostgreSQL): admin auth, validation, compare-and-set,
leases, feedback, model errors, shadow mode, the registry and /metrics."""

from __future__ import annotations

import json
import time

import requests
from gw_util import fraud_requests, predict, query


def _error_rows(db_url: str) -> int:
    return query(db_url, "SELECT COUNT(*) FROM predictions WHERE status = 'error'")[0][0]


def test_admin_auth_and_bad_input_are_rejected_and_not_logged_as_errors(gateway, model_dir, db_url) -> None:
    s = requests.Session()
    url = gateway.url
    route_body = {"stable": "v1", "canary": "v2", "canary_percent": 5, "mode": "split", "lease_seconds": 60}
    # admin auth: 401 without, 403 with a wrong token, on every admin call
    for method, path, body in [
        ("PUT", "/v1/models/fraud/route", route_body),
        ("POST", "/v1/models/fraud/route/renew", {"if_generation": 1, "lease_seconds": 5}),
        ("PUT", "/v1/models/fraud/versions/v2/stage", {"stage": "production"}),
    ]:
        r = s.request(method, url + path, json=body, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"
        r = s.request(method, url + path, json=body, headers={"Authorization": "Bearer wrong-token"}, timeout=10)
        assert r.status_code == 403, (path, r.text)
        r = s.request(method, url + path, json=body, headers={"Authorization": "Basic abc"}, timeout=10)
        assert r.status_code == 401, (path, r.text)
    assert gateway.route("fraud")["generation"] == 1, "a rejected admin call changed the route"
    assert json.loads((model_dir / "fraud" / "v2" / "metadata.json").read_text())["stage"] == "candidate"

    # bad route values: 422 naming the field
    bad_routes = {
        "canary_percent": {**route_body, "canary_percent": 101},
        "canary=null": {**route_body, "canary": None},
        "equals stable": {**route_body, "canary": "v1"},
        "lease_seconds": {k: v for k, v in route_body.items() if k != "lease_seconds"},
        "mode=": {**route_body, "mode": "mirror"},
        "unknown version": {**route_body, "canary": "v9"},
        "unknown route field": {**route_body, "canary_pct": 5},
        "lease_seconds=0": {**route_body, "lease_seconds": 0},
    }
    for needle, body in bad_routes.items():
        r = gateway.set_route("fraud", **body)
        assert r.status_code == 422, (needle, r.text)
        assert needle in r.json()["detail"], (needle, r.json())
    shadow_without_lease = {"stable": "v1", "canary": "v2", "canary_percent": 0, "mode": "shadow"}
    assert gateway.set_route("fraud", **shadow_without_lease).status_code == 422
    assert gateway.route("fraud")["generation"] == 1, "a rejected route changed the route"

    # unknown models and path tricks: 404
    good = fraud_requests(1, seed=2)[0]
    assert predict(s, gateway, good, model="nope").status_code == 404
    assert s.get(f"{url}/v1/models/nope/route", timeout=10).status_code == 404
    assert s.get(f"{url}/v1/models/fraud/versions/..", timeout=10).status_code == 404
    assert s.get(f"{url}/v1/models/..%2Ffraud/route", timeout=10).status_code == 404
    assert gateway.set_route("nope", **route_body).status_code == 404

    # bad predict bodies: 422 with a message
    r = predict(s, gateway, {"unit_id": "u1", "features": {"amount": 10.0}})
    assert r.status_code == 422 and "missing feature(s)" in r.text and "merchant_risk" in r.text
    r = predict(s, gateway, {"unit_id": "u1", "features": {**good["features"], "amount": "ten"}})
    assert r.status_code == 422 and "'amount'" in r.text
    assert predict(s, gateway, {"unit_id": "u1", "features": [1, 2]}).status_code == 422
    assert predict(s, gateway, {"unit_id": 5, "features": good["features"]}).status_code == 422
    assert predict(s, gateway, {**good, "request_id": "../x"}).status_code == 422
    r = s.post(f"{url}/v1/models/fraud/predict", data=b"{not json", timeout=10)
    assert r.status_code == 422 and "not valid JSON" in r.text

    # feedback: unknown request id 404, bad label 422
    r = s.post(f"{url}/v1/models/fraud/feedback", json={"request_id": "never-seen", "label": 1}, timeout=10)
    assert r.status_code == 404 and "never-seen" in r.text
    ok = predict(s, gateway, good).json()
    r = s.post(f"{url}/v1/models/fraud/feedback", json={"request_id": ok["request_id"], "label": "yes"}, timeout=10)
    assert r.status_code == 422 and "label" in r.text
    r = s.post(f"{url}/v1/models/eta/feedback", json={"request_id": ok["request_id"], "label": 1}, timeout=10)
    assert r.status_code == 404 and "belongs to model 'fraud'" in r.text

    metrics = s.get(f"{url}/metrics", timeout=10).text
    assert 'status="error"' not in metrics
    s.close()
    gateway.stop()
    assert _error_rows(db_url) == 0
    assert query(db_url, "SELECT COUNT(*) FROM predictions")[0][0] == 1  # only the one good prediction
    assert gateway.token not in gateway.log_text(), "the admin token appeared in the gateway's log"


def test_compare_and_set_and_lease_expiry(gateway, db_url) -> None:
    s = requests.Session()
    start = gateway.route("fraud")
    body = {"stable": "v1", "canary": "v2", "canary_percent": 50, "mode": "split", "lease_seconds": 1}
    stale = gateway.set_route("fraud", **body, if_generation=start["generation"] - 1)
    assert stale.status_code == 409 and "generation" in stale.json()["detail"]
    assert gateway.route("fraud") == start, "a stale compare-and-set changed the route"

    r = gateway.set_route("fraud", **body, if_generation=start["generation"])
    assert r.status_code == 200, r.text
    route = r.json()
    assert route["generation"] == start["generation"] + 1 and route["salt"] == start["salt"]
    assert route["lease_expires_at"] is not None
    bodies = fraud_requests(60, seed=4)
    arms = {predict(s, gateway, b).json()["arm"] for b in bodies}
    assert arms == {"stable", "canary"}

    # renewing with a stale generation is refused; a good renewal keeps the generation
    r = s.post(f"{gateway.url}/v1/models/fraud/route/renew", json={"if_generation": 1, "lease_seconds": 1},
               headers=gateway.admin_headers, timeout=10)
    assert r.status_code == 409
    r = s.post(f"{gateway.url}/v1/models/fraud/route/renew",
               json={"if_generation": route["generation"], "lease_seconds": 1},
               headers=gateway.admin_headers, timeout=10)
    assert r.status_code == 200 and r.json()["generation"] == route["generation"]
    assert r.json()["lease_expires_at"] > route["lease_expires_at"]

    # not renewed again: the gateway itself returns all traffic to stable
    deadline = time.monotonic() + 10
    while gateway.route("fraud")["canary_percent"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    expired = gateway.route("fraud")
    assert expired["canary_percent"] == 0 and expired["mode"] == "split"
    assert expired["canary"] == "v2", "the canary is kept for the record"
    assert expired["generation"] == route["generation"] + 1 and expired["lease_expires_at"] is None
    assert {predict(s, gateway, b).json()["arm"] for b in bodies} == {"stable"}
    metrics = s.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'canary_gateway_lease_expirations_total{model="fraud"} 1.0' in metrics
    assert 'canary_gateway_canary_percent{model="fraud"} 0.0' in metrics
    written = [line for line in metrics.splitlines() if line.startswith("canary_gateway_log_rows_written_total")]
    assert written and float(written[0].split()[-1]) >= 60, written  # the 60 predictions above were committed
    # the old generation can no longer renew: the rollout must notice the expiry
    r = s.post(f"{gateway.url}/v1/models/fraud/route/renew",
               json={"if_generation": route["generation"], "lease_seconds": 60},
               headers=gateway.admin_headers, timeout=10)
    assert r.status_code == 409
    s.close()
    gateway.stop()
    assert "lease of model fraud expired" in gateway.log_text()
    stored = query(db_url, "SELECT canary_percent, generation FROM routes WHERE model = 'fraud'")
    assert stored == [(0.0, expired["generation"])]


def test_feedback_errors_nan_scores_and_shadow(model_dir, db_url) -> None:
    from gateway.testing import run_gateway

    # a long flush interval keeps rows in the write queue: feedback must still find them
    with run_gateway(model_dir, db_url, extra_args=["--flush-interval", "1.5"]) as gw:
        s = requests.Session()
        bodies = fraud_requests(200, seed=5)
        answer = predict(s, gw, bodies[0]).json()
        r = s.post(f"{gw.url}/v1/models/fraud/feedback",
                   json={"request_id": answer["request_id"], "label": 1, "source": "test"}, timeout=10)
        assert r.status_code == 202, r.text

        # v4 as the only arm: errors on country 4 (500 with request_id), NaN scores above the amount cap
        assert gw.set_route("fraud", stable="v1", canary="v4", canary_percent=100, lease_seconds=600).status_code == 200
        new_market = {**bodies[1], "features": {**bodies[1]["features"], "country": 4.0}}
        r = predict(s, gw, new_market)
        assert r.status_code == 500 and r.json()["request_id"] and "unknown category 4" in r.json()["detail"]
        failed_id = r.json()["request_id"]
        big = {**bodies[2], "features": {**bodies[2]["features"], "amount": 900.0, "country": 1.0}}
        r = predict(s, gw, big)
        assert r.status_code == 200 and r.json()["score"] is None and r.json()["version"] == "v4"
        nan_id = r.json()["request_id"]

        # shadow: stable answers, the canary is called and logged with arm "shadow"
        r = gw.set_route("fraud", stable="v1", canary="v2", canary_percent=100, mode="shadow", lease_seconds=600)
        assert r.status_code == 200, r.text
        shadow_answers = [predict(s, gw, b).json() for b in bodies[10:40]]
        assert {(a["arm"], a["version"]) for a in shadow_answers} == {("stable", "v1")}
        metrics = s.get(f"{gw.url}/metrics", timeout=10).text
        assert 'canary_gateway_requests_total{arm="canary",model="fraud",status="error",version="v4"} 1.0' in metrics
        assert "canary_gateway_request_latency_seconds_bucket" in metrics
        s.close()
    assert query(db_url, "SELECT label, source FROM feedback WHERE request_id = :r", r=answer["request_id"]) == [
        (1.0, "test")
    ]
    status, error = query(db_url, "SELECT status, error FROM predictions WHERE request_id = :r", r=failed_id)[0]
    assert status == "error" and "unknown category 4" in error
    assert query(db_url, "SELECT status, score, version FROM predictions WHERE request_id = :r", r=nan_id) == [
        ("ok", None, "v4")
    ]
    shadow_units = query(db_url, "SELECT unit_id, version FROM predictions WHERE arm = 'shadow'")
    assert sorted(u for u, _ in shadow_units) == sorted(b["unit_id"] for b in bodies[10:40])
    assert {v for _, v in shadow_units} == {"v2"}


def test_registry_listing_stage_and_unloadable_candidate(gateway, model_dir) -> None:
    s = requests.Session()
    broken = model_dir / "fraud" / "v5"
    broken.mkdir()
    meta = json.loads((model_dir / "fraud" / "v2" / "metadata.json").read_text())
    (broken / "metadata.json").write_text(json.dumps({**meta, "version": "v5"}))
    (broken / "model.joblib").write_bytes(b"not a pickle")

    listing = s.get(f"{gateway.url}/v1/models", timeout=30).json()["models"]
    fraud = {v["version"]: v for m in listing if m["model"] == "fraud" for v in m["versions"]}
    assert set(fraud) == {"v1", "v2", "v3", "v4", "v5"}, "a newly registered version must appear"
    assert fraud["v1"]["stage"] == "production" and fraud["v1"]["loadable"] is True
    assert set(fraud["v2"]["eval_metrics"]) == {"accuracy", "auc", "log_loss"}
    assert fraud["v2"]["features"][0] == "amount" and fraud["v2"]["training_data"]["period"] == "current"
    assert fraud["v5"]["loadable"] is False and "model.joblib" in fraud["v5"]["error"]
    one = s.get(f"{gateway.url}/v1/models/fraud/versions/v5", timeout=30).json()
    assert one["loadable"] is False and one["model"] == "fraud"
    eta = s.get(f"{gateway.url}/v1/models/eta/versions/v2", timeout=30).json()
    assert eta["kind"] == "regressor" and set(eta["eval_metrics"]) == {"mae", "rmse"}

    r = gateway.set_route("fraud", stable="v1", canary="v5", canary_percent=5, lease_seconds=60)
    assert r.status_code == 422 and "cannot be loaded" in r.json()["detail"]
    assert gateway.route("fraud")["canary"] is None

    r = s.put(f"{gateway.url}/v1/models/fraud/versions/v2/stage", json={"stage": "live"},
              headers=gateway.admin_headers, timeout=10)
    assert r.status_code == 422 and "stage" in r.text
    r = s.put(f"{gateway.url}/v1/models/fraud/versions/v2/stage", json={"stage": "production"},
              headers=gateway.admin_headers, timeout=10)
    assert r.status_code == 200 and r.json()["stage"] == "production"
    stages = {v: json.loads((model_dir / "fraud" / v / "metadata.json").read_text())["stage"] for v in ("v1", "v2")}
    assert stages == {"v1": "archived", "v2": "production"}

    # a regressor answers a number and a null score
    eta_body = {"unit_id": "c1", "features": {"distance_km": 3.0, "hour": 8, "traffic_index": 0.5, "n_items": 2,
                                              "courier_rating": 4.6}}
    r = predict(s, gateway, eta_body, model="eta")
    assert r.status_code == 200 and r.json()["score"] is None and r.json()["prediction"] > 0
    s.close()


def test_a_classifier_with_text_classes_is_unloadable_with_the_fix(gateway, model_dir) -> None:
    """The log stores numeric predictions and labels: a classifier answering "yes"/"no" would be logged as
    NULL and its label metrics would have no data, so the registry refuses it and says how to fix it."""
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(3).normal(size=(200, 7))
    text = LogisticRegression().fit(x, np.where(x[:, 0] > 0, "yes", "no"))
    booleans = LogisticRegression().fit(x, x[:, 0] > 0)
    meta = json.loads((model_dir / "fraud" / "v1" / "metadata.json").read_text())
    for version, est in (("v8", text), ("v9", booleans)):
        folder = model_dir / "fraud" / version
        folder.mkdir()
        joblib.dump(est, folder / "model.joblib")
        (folder / "metadata.json").write_text(json.dumps({**meta, "version": version, "stage": "candidate"}))
    s = requests.Session()
    v8 = s.get(f"{gateway.url}/v1/models/fraud/versions/v8", timeout=30).json()
    assert v8["loadable"] is False and "are not numbers" in v8["error"] and "numeric labels" in v8["error"], v8
    assert s.get(f"{gateway.url}/v1/models/fraud/versions/v9", timeout=30).json()["loadable"] is True
    r = gateway.set_route("fraud", stable="v1", canary="v8", canary_percent=5, lease_seconds=60)
    assert r.status_code == 422 and "are not numbers" in r.json()["detail"], r.text
