"""``make airflow`` (``python -m airflow_local``) really starts: Airflow standalone, the gateway and the
traffic, here with a user's own model, specs, suites and CSV (docs/own-model.md), and stops cleanly.

It runs the real ``airflow standalone`` (API server, scheduler, DAG processor, triggerer) on free loopback
ports with a private ``var`` folder; nothing is mocked. It checks what a user sees in the UI through the
same REST API the UI uses: the user's rollout DAG with its trigger form, and a broken spec shown as a
placeholder DAG with its message instead of stopping the start-up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests
import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[2]
FEATURES = ["tenure_months", "plan_price", "support_tickets"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _churn(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"customer_id": [f"c{u}" for u in rng.integers(0, 300, n)],
                       "tenure_months": rng.integers(1, 72, n), "plan_price": rng.uniform(10, 120, n).round(2),
                       "support_tickets": rng.poisson(1.5, n)})
    df["churned"] = ((df.support_tickets >= 3) & (df.tenure_months < 24)).astype(int)
    return df


def _user_folders(tmp: Path) -> dict[str, Path]:
    import joblib
    from gateway.register import register_version
    from sklearn.naive_bayes import GaussianNB
    from sklearn.tree import DecisionTreeClassifier

    train = _churn(2000, 1)
    joblib.dump(GaussianNB().fit(train[FEATURES], train.churned), tmp / "nb.joblib")
    joblib.dump(DecisionTreeClassifier(max_depth=4).fit(train[FEATURES], train.churned), tmp / "tree.joblib")
    models = tmp / "models"
    register_version(models, "churn", "v1", tmp / "nb.joblib", "classifier", stage="production")
    register_version(models, "churn", "v2", tmp / "tree.joblib", "classifier")
    rollouts, suites = tmp / "rollouts", tmp / "expectations"
    rollouts.mkdir()
    suites.mkdir()
    spec = yaml.safe_load((REPO / "include" / "rollouts" / "fraud.yaml").read_text())
    spec.update(model="churn", data_quality={"suite": "churn", "sample_size": 1000}, tags=["churn"])
    (rollouts / "churn.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (rollouts / "typo.yaml").write_text((rollouts / "churn.yaml").read_text().replace("model: churn", "model: typo")
                                        .replace("steps:", "stepz:"))
    (suites / "churn.json").write_text(json.dumps({"name": "churn", "expectations": [
        {"type": "expect_column_to_exist", "kwargs": {"column": c}} for c in FEATURES]}))
    csv = tmp / "traffic.csv"
    _churn(3000, 2).to_csv(csv, index=False)
    return {"models": models, "rollouts": rollouts, "suites": suites, "csv": csv}


def _processes_with_env(needle: bytes) -> list[str]:
    """Live processes whose environment holds ``needle`` (this test's Airflow home), as 'pid cmdline'."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in (entry / "environ").read_bytes():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {cmdline[:80]}")
        except (OSError, IndexError):
            continue
    return found


def _wait(what: str, probe, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"airflow_local exited ({proc.returncode}) while waiting for {what}:\n" + \
            log.read_text()[-4000:]
        try:
            last = probe()
            if last:
                return last
        except (requests.RequestException, sa.exc.DBAPIError, OSError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(2)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last!r}):\n" + log.read_text()[-4000:])


def test_make_airflow_with_a_users_own_model_specs_and_traffic(tmp_path):
    user = _user_folders(tmp_path)
    var, api_port, gw_port = tmp_path / "var", _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}  # not the test session's Airflow
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "include"), str(REPO / "plugins")])
    log = tmp_path / "airflow_local.log"
    cmd = [sys.executable, "-m", "airflow_local", "--var-dir", str(var), "--airflow-port", str(api_port),
           "--gateway-port", str(gw_port), "--rate", "15", "--model", "churn",
           "--model-dir", str(user["models"]), "--rollouts-dir", str(user["rollouts"]),
           "--expectations-dir", str(user["suites"]), "--csv", str(user["csv"]),
           "--label-column", "churned", "--unit-column", "customer_id"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the user's rows reach the gateway and are logged with their labels' features
        db = sa.create_engine(f"sqlite:///{var / 'predictions.db'}")

        def logged() -> int:
            with db.connect() as c:
                return c.execute(sa.text("SELECT COUNT(*) FROM predictions WHERE model = 'churn'")).scalar()

        _wait("replayed predictions in the log", lambda: logged() >= 20, 180, proc, log)
        with db.connect() as c:
            features = json.loads(c.execute(sa.text("SELECT features FROM predictions LIMIT 1")).scalar())
        assert sorted(features) == sorted(FEATURES)
        db.dispose()

        base = f"http://127.0.0.1:{api_port}"
        _wait("the API server", lambda: requests.get(f"{base}/api/v2/monitor/health", timeout=5).ok, 240, proc, log)
        passwords = var / "airflow" / "simple_auth_manager_passwords.json.generated"
        _wait("the admin password file", passwords.is_file, 60, proc, log)
        password = json.loads(passwords.read_text())["admin"]
        token = requests.post(f"{base}/auth/token", json={"username": "admin", "password": password},
                              timeout=10).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        def dags() -> dict[str, dict]:
            answer = requests.get(f"{base}/api/v2/dags", params={"dag_id_pattern": "canary_rollout"},
                                  headers=auth, timeout=10).json()
            found = {d["dag_id"]: d for d in answer["dags"]}
            return found if {"canary_rollout__churn", "canary_rollout__typo"} <= set(found) else {}

        found = _wait("the user's rollout DAGs", dags, 240, proc, log)
        assert "broken-spec" in {t["name"] for t in found["canary_rollout__typo"]["tags"]}
        assert "stepz" in (found["canary_rollout__typo"]["description"] or ""), found["canary_rollout__typo"]
        assert "canary_rollout__fraud" not in found  # only the user's specs
        assert found["canary_rollout__churn"]["is_paused"] is False
        details = requests.get(f"{base}/api/v2/dags/canary_rollout__churn/details", headers=auth, timeout=10).json()
        assert {"candidate", "steps", "margins"} <= set(details["params"]), details["params"]
        demo_copy = yaml.safe_load((var / "demo" / "rollouts" / "churn.yaml").read_text())
        assert demo_copy["clusters"]["width"] == 10 and demo_copy["data_quality"]["suite"] == "churn"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-4000:]
    home = f"AIRFLOW_HOME={var / 'airflow'}".encode()
    deadline = time.monotonic() + 20
    while (left := _processes_with_env(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of this Airflow home outlived the stop: {left}"
    for port in (api_port, gw_port):  # everything it started is gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after the stop"
