"""Nothing is lost: every answered request is in the log, including those answered while the gateway shuts down
and those that waited on a full write queue; a restart keeps the route; no token, no start."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import requests
from gateway.testing import run_gateway, start_gateway
from gw_util import fraud_requests, query


def test_every_answered_request_is_logged_through_sigterm(model_dir, db_url) -> None:
    # a tiny queue and batches force back-pressure on the request path while the shutdown happens
    gw = start_gateway(model_dir, db_url, extra_args=["--max-queue", "16", "--batch-size", "8"])
    assert gw.set_route("fraud", stable="v1", canary="v2", canary_percent=50, lease_seconds=600).status_code == 200
    bodies = fraud_requests(400, seed=7)
    answered: list[list[str]] = [[] for _ in range(4)]
    refused, signalled = threading.Event(), threading.Event()
    after_signal: list[str] = []

    def client(slot: int) -> None:
        session = requests.Session()
        i = slot
        while not refused.is_set():
            body = bodies[i % len(bodies)]
            try:
                r = session.post(f"{gw.url}/v1/models/fraud/predict", json=body, timeout=30)
            except requests.RequestException:
                refused.set()  # the listener is closed: the gateway is going away
                break
            if r.status_code in (200, 500):
                answered[slot].append(r.json()["request_id"])
                if signalled.is_set():
                    after_signal.append(r.json()["request_id"])
            i += 4
        session.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(map(len, answered)) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    signalled.set()
    gw.process.send_signal(15)  # SIGTERM while the clients keep sending
    gw.process.wait(60)
    refused.set()
    for t in threads:
        t.join(30)
    ids = [rid for slot in answered for rid in slot]
    assert len(ids) >= 300 and len(set(ids)) == len(ids)
    logged = {row[0] for row in query(db_url, "SELECT request_id FROM predictions")}
    missing = set(ids) - logged
    assert not missing, f"{len(missing)} answered requests are not in the log"
    assert after_signal, "no request was in flight at SIGTERM: the test did not exercise the shutdown path"
    assert set(after_signal) <= logged
    assert "gateway stopped" in gw.log_text()


def test_restart_keeps_the_route_and_expires_a_lease_that_ran_out_while_down(model_dir, db_url) -> None:
    with run_gateway(model_dir, db_url) as gw:
        r = gw.set_route("fraud", stable="v1", canary="v3", canary_percent=12.5, lease_seconds=3600)
        assert r.status_code == 200, r.text
        before = gw.route("fraud")
        r = gw.set_route("eta", stable="v1", canary="v2", canary_percent=40, lease_seconds=1)
        assert r.status_code == 200, r.text
        eta_before = r.json()
        gw.kill()  # no graceful stop: the route was stored before the PUT was answered; nobody renews the lease
    time.sleep(1.2)
    with run_gateway(model_dir, db_url) as gw:
        assert gw.route("fraud") == before
        eta = gw.route("eta")
        assert eta["canary_percent"] == 0 and eta["canary"] == "v2" and eta["lease_expires_at"] is None
        assert eta["generation"] == eta_before["generation"] + 1 and eta["salt"] == eta_before["salt"]
        stale = gw.set_route("fraud", stable="v1", canary=None, canary_percent=0, if_generation=before["generation"] - 1)
        assert stale.status_code == 409
        assert gw.route("fraud") == before


def test_gateway_refuses_to_start_without_a_token(model_dir, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CANARY_GATEWAY_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--model-dir", str(model_dir), "--db-url", f"sqlite:///{tmp_path}/x.db",
         "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "CANARY_GATEWAY_TOKEN" in result.stderr
