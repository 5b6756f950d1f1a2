"""The docker-compose services, started here as plain processes, and a rollout driven through the REST API.

What runs (each with its compose ``command:`` and environment, see ``stack_processes``): ``stack.init_airflow``,
``airflow api-server``, ``airflow scheduler``, ``airflow dag-processor``, ``airflow triggerer`` (LocalExecutor,
SQLite metadata database in a temp AIRFLOW_HOME), the demo-model training, the gateway (prediction log in a
fresh PostgreSQL database made by the compose postgres init script) and the simulator. Every compose
healthcheck is run against them. Then, as a user would: log in at ``/auth/token``, unpause the rollout DAG,
trigger it with a conf like the trigger form sends, follow the run through ``/api/v2`` until it ends, read the
decision record from the task log through the API, and check the gateway's route.

Bounded: every wait has a timeout, the module has a hard pytest timeout, and teardown kills every process
group this module started.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from stack_compose import REPO, environment, interpolate, load_compose
from stack_processes import (
    LocalPorts,
    ProcessGroup,
    airflow_argv,
    airflow_environment,
    command_argv,
    local_executable,
    replace_option,
    run_healthcheck,
    wait_for,
)

pytestmark = pytest.mark.timeout(360)

DAG_ID = "canary_rollout__fraud"
MODEL = "fraud"
RUN_TIMEOUT = 240  # seconds for the rollout run itself; start-up and warm-up take about a minute more
SIMULATOR_RATE = 50  # requests per second
WARMUP_ANSWERS = 20 * SIMULATOR_RATE // 2  # at least 20 s of traffic at half the nominal rate
AIRFLOW_SERVICES = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


@dataclass
class Stack:
    """The running stack: where things are and how to reach them."""

    group: ProcessGroup
    home: Path
    ports: LocalPorts
    admin_user: str
    admin_password: str
    gateway_token: str
    prediction_db_url: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def token(self) -> str:
        """A JWT from the simple auth manager, as a script would get one."""
        answer = requests.post(f"{self.api}/auth/token", timeout=10,
                               json={"username": self.admin_user, "password": self.admin_password})
        assert answer.status_code == 201, answer.text
        return answer.json()["access_token"]


def _secret_values() -> dict[str, str]:
    """Fresh values for every variable .env provides (what `python -m stack.make_env` would write)."""
    from stack.make_env import fernet_key

    return {
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": secrets.token_urlsafe(32),
        "AIRFLOW_ADMIN_USER": "admin",
        "AIRFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(32),
        "AIRFLOW_JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW_SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW_FERNET_KEY": fernet_key(),
        "CANARY_GATEWAY_TOKEN": secrets.token_urlsafe(32),
        "AIRFLOW_API_PORT": "8080",
        "GATEWAY_PORT": "8808",
        "SIMULATOR_MODEL": MODEL,
        "SIMULATOR_RATE": str(SIMULATOR_RATE),
        "SIMULATOR_DURATION": "300",
    }


def _prediction_database(env: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """Create a uniquely named prediction-log database with the compose postgres init script; drop it after."""
    from conftest import PG_URL

    url = make_url(PG_URL)
    name = f"stack_e2e_{uuid.uuid4().hex[:10]}"
    script = REPO / "include" / "stack" / "postgres-init" / "10-prediction-log.sh"
    created = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": os.environ["PATH"], "PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
             "POSTGRES_USER": url.username or "postgres", "POSTGRES_DB": url.database or "postgres",
             "CANARY_PREDICTION_DB": name, **({"PGPASSWORD": url.password} if url.password else {})},
    )
    assert created.returncode == 0, created.stderr
    db_url = url.set(database=name).render_as_string(hide_password=False)
    conn = {"host": url.host or "127.0.0.1", "port": url.port or 5432, "schema": name,
            "login": url.username or "postgres", "password": url.password or ""}
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        yield db_url, conn
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    compose = load_compose()["services"]
    home = tmp_path_factory.mktemp("stack")
    values = _secret_values()
    ports = LocalPorts()
    group = ProcessGroup(home)
    db_gen = _prediction_database(values)
    db_url, log_conn = next(db_gen)
    try:
        yield _start(compose, home, values, ports, group, db_url, log_conn)
    finally:
        group.stop_all()
        next(db_gen, None)


def _start(compose, home, values, ports, group, db_url, log_conn) -> Stack:
    # The project's fraud spec with hold windows of seconds (the demo's copy): a user's own spec folder.
    from canary_demo.scenario import write_demo_spec

    rollouts = home / "rollouts"
    write_demo_spec(rollouts)
    env = {
        name: airflow_environment(compose[name], values, home=home, ports=ports, prediction_log=log_conn,
                                  rollouts_dir=rollouts)
        for name in ("airflow-init", *AIRFLOW_SERVICES)
    }
    # One JWT secret (and one everything else) for every Airflow process, exactly as in the compose file.
    assert len({json.dumps(e, sort_keys=True) for n, e in env.items() if n != "airflow-init"}) == 1

    # 1. airflow-init: secrets checked, database migrated, admin password written.
    init_argv = local_executable(airflow_argv(command_argv(compose["airflow-init"], values)))
    init = subprocess.run(init_argv, env=env["airflow-init"], capture_output=True, text=True, timeout=180,
                          check=False)
    assert init.returncode == 0, init.stdout[-3000:] + init.stderr[-3000:]
    assert values["AIRFLOW_ADMIN_PASSWORD"] not in init.stdout + init.stderr

    # 2. demo-models (one-shot, before the gateway).
    models = home / "models"
    train_argv = local_executable(command_argv(compose["demo-models"], values))
    train_argv = replace_option(train_argv, "--out", str(models))
    trained = subprocess.run(train_argv, env=_service_env(compose["demo-models"], values, home),
                             capture_output=True, text=True, timeout=120, check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]

    # 3. The long-running services.
    for name in AIRFLOW_SERVICES:
        group.start(name, local_executable(airflow_argv(command_argv(compose[name], values))), env[name])
    gateway_argv = local_executable(command_argv(compose["gateway"], values))
    for option, value in (("--model-dir", str(models)), ("--db-url", db_url),
                          ("--spill-path", str(home / "gateway" / "spill.jsonl")), ("--host", "127.0.0.1"),
                          ("--port", str(ports.gateway))):
        gateway_argv = replace_option(gateway_argv, option, value)
    (home / "gateway").mkdir()
    gateway_env = _service_env(compose["gateway"], values, home)
    gateway_env["PGPASSWORD"] = log_conn["password"]  # the local PostgreSQL's, not the compose one
    group.start("gateway", gateway_argv, gateway_env)

    # 4. Every compose healthcheck passes against the local processes.
    substitutions = {"http://localhost:8080": f"http://127.0.0.1:{ports.api}",
                     "http://localhost:8974": f"http://127.0.0.1:{ports.scheduler_health}",
                     "http://localhost:8808": f"http://127.0.0.1:{ports.gateway}",
                     "http://127.0.0.1:8808": f"http://127.0.0.1:{ports.gateway}"}

    def healthy(name: str) -> None:
        check = compose[name]["healthcheck"]["test"]
        check_env = env.get(name) or _service_env(compose[name], values, home)
        wait_for(lambda: run_healthcheck(check, check_env, substitutions).returncode == 0,
                 timeout=150, interval=1, what=f"the {name} healthcheck {check}", group=group)

    with ThreadPoolExecutor(max_workers=5) as pool:  # the checks are independent: wait for them together
        for future in [pool.submit(healthy, name) for name in (*AIRFLOW_SERVICES, "gateway")]:
            future.result()

    # 5. The simulator (its compose profile): traffic and label feedback for the rollout to judge.
    simulator_argv = local_executable(command_argv(compose["simulator"], values))
    simulator_argv = replace_option(simulator_argv, "--url", stack_gateway_url(ports))
    group.start("simulator", simulator_argv, _service_env(compose["simulator"], values, home))
    sim_check = compose["simulator"]["healthcheck"]["test"]
    assert run_healthcheck(sim_check, _plain_env(home), substitutions).returncode == 0

    pg_env = {**_plain_env(home), "POSTGRES_USER": log_conn["login"], "POSTGRES_PASSWORD": log_conn["password"],
              "CANARY_PREDICTION_DB": log_conn["schema"]}
    pg_check = run_healthcheck(compose["postgres"]["healthcheck"]["test"], pg_env, {})
    assert pg_check.returncode == 0, pg_check.stderr

    return Stack(group=group, home=home, ports=ports, admin_user=values["AIRFLOW_ADMIN_USER"],
                 admin_password=values["AIRFLOW_ADMIN_PASSWORD"], gateway_token=values["CANARY_GATEWAY_TOKEN"],
                 prediction_db_url=db_url)


def stack_gateway_url(ports: LocalPorts) -> str:
    return f"http://127.0.0.1:{ports.gateway}"


def _plain_env(home: Path) -> dict[str, str]:
    """What the image gives every process: PATH with the venv first, HOME, locale, import paths."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", str(home)), "LANG": "C.UTF-8",
            "PYTHONPATH": f"{REPO / 'include'}:{REPO / 'plugins'}", "GX_ANALYTICS_ENABLED": "False"}


def _service_env(service: dict, values: dict[str, str], home: Path) -> dict[str, str]:
    """A non-Airflow service's compose environment (interpolated), plus what the image gives every process."""
    env = {key: interpolate(value, values) for key, value in environment(service).items()}
    return {**env, **_plain_env(home)}


def _stable_answers(stack: Stack) -> float:
    """Successful answers of the stable arm so far, from the gateway's Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text_ = requests.get(f"{stack.gateway}/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text_) for sample in family.samples
               if sample.name == "canary_gateway_requests_total" and sample.labels.get("model") == MODEL
               and sample.labels.get("arm") == "stable" and sample.labels.get("status") == "ok")


def _get(stack: Stack, token: str, path: str, **params) -> requests.Response:
    return requests.get(f"{stack.api}{path}", headers={"Authorization": f"Bearer {token}"}, params=params,
                        timeout=15)


def test_every_service_is_up_and_airflow_reports_its_components_healthy(stack):
    stack.group.check_running()
    health = requests.get(f"{stack.api}/api/v2/monitor/health", timeout=10).json()
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        assert health[component]["status"] == "healthy", health
    assert requests.get(f"{stack.gateway}/healthz", timeout=5).json() == {"status": "ok"}


def test_the_rest_api_needs_a_valid_login(stack):
    assert requests.get(f"{stack.api}/api/v2/dags", timeout=10).status_code == 401
    wrong = requests.post(f"{stack.api}/auth/token", json={"username": stack.admin_user, "password": "nope"},
                          timeout=10)
    assert wrong.status_code == 401
    forged = requests.get(f"{stack.api}/api/v2/dags", timeout=10,
                          headers={"Authorization": "Bearer " + secrets.token_urlsafe(40)})
    assert forged.status_code in (401, 403)
    assert _get(stack, stack.token(), "/api/v2/dags").status_code == 200


def test_the_rollout_dags_are_parsed_without_import_errors(stack):
    token = stack.token()
    dag = wait_for(lambda: _get(stack, token, f"/api/v2/dags/{DAG_ID}").status_code == 200,
                   timeout=120, interval=2, what=f"{DAG_ID} to appear in the REST API", group=stack.group)
    assert dag
    errors = _get(stack, token, "/api/v2/importErrors").json()
    assert errors["total_entries"] == 0, errors
    specs = sorted(p.stem for p in (stack.home / "rollouts").glob("*.yaml"))
    listed = {d["dag_id"] for d in _get(stack, token, "/api/v2/dags", limit=100).json()["dags"]}
    assert {f"canary_rollout__{s}" for s in specs} <= listed


def _log_items(stack: Stack, token: str, run_id: str, task: dict, try_number: int | None = None) -> list[dict]:
    """The task's structured log through the REST API (what the UI's log view shows); [] if it has none."""
    number = try_number or task.get("try_number") or 0
    if number < 1:
        return []
    answer = _get(stack, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task['task_id']}"
                  f"/logs/{number}", full_content="true")
    if answer.status_code != 200:
        return [{"event": f"(log not readable: {answer.status_code} {answer.text[:200]})"}]
    return [item if isinstance(item, dict) else {"event": str(item)} for item in answer.json()["content"]]


def _decision_records(stack: Stack, token: str, run_id: str, tasks: dict[str, dict]) -> dict[str, list[str]]:
    """Every decision record written to the ``step_<i>.analyze`` task logs, per task."""
    return {task_id: [str(e.get("event", "")) for e in _log_items(stack, token, run_id, ti)
                      if "DECISION:" in str(e.get("event", ""))]
            for task_id, ti in sorted(tasks.items())
            if task_id.endswith(".analyze") and ti["state"] not in ("skipped", None)}


def _errors(stack: Stack, token: str, run_id: str, tasks: dict[str, dict]) -> str:
    """The exceptions in the logs of every try of each task that failed or is retrying, one line each."""
    lines = []
    for task_id, ti in sorted(tasks.items()):
        retried = (ti.get("try_number") or 0) > 1
        if ti["state"] not in ("failed", "up_for_retry") and task_id not in ("rollback", "pause") and not retried:
            continue
        for number in range(1, (ti.get("try_number") or 0) + 1):
            for item in _log_items(stack, token, run_id, ti, number):
                for detail in item.get("error_detail") or []:
                    lines.append(f"{task_id} try {number}: {detail.get('exc_type')}: "
                                 f"{str(detail.get('exc_value'))[:700]}")
    return "\n".join(lines)


def test_a_rollout_triggered_through_the_rest_api_runs_to_its_end(stack):
    token = stack.token()
    headers = {"Authorization": f"Bearer {token}"}
    wait_for(lambda: _get(stack, token, f"/api/v2/dags/{DAG_ID}").status_code == 200,
             timeout=120, interval=2, what=f"{DAG_ID} in the REST API", group=stack.group)
    unpaused = requests.patch(f"{stack.api}/api/v2/dags/{DAG_ID}", json={"is_paused": False}, headers=headers,
                              timeout=15)
    assert unpaused.status_code == 200, unpaused.text
    # As in production, stable has served traffic before the rollout starts: pre-flight measures its
    # baseline (latency p95, base rates) on the log. Wait for 20 s of the simulator's traffic.
    wait_for(lambda: _stable_answers(stack) >= WARMUP_ANSWERS, timeout=90, interval=2,
             what=f"{WARMUP_ANSWERS} stable answers from the simulator's traffic", group=stack.group)
    route_before = requests.get(f"{stack.gateway}/v1/models/{MODEL}/route", timeout=5).json()
    assert route_before["stable"] == "v1" and route_before["canary_percent"] == 0, route_before

    # What the trigger form does: read the DAG's params, start from their defaults, change some fields
    # (the good candidate, two traffic steps, short holds; margins left at the spec's), send all of them.
    details = _get(stack, token, f"/api/v2/dags/{DAG_ID}/details")
    assert details.status_code == 200, details.text
    form = {name: (param.get("value") if isinstance(param, dict) and "value" in param else param)
            for name, param in (details.json()["params"] or {}).items()}
    assert set(form) == {"candidate", "steps", "hold_min_duration", "hold_min_samples", "hold_max_wait",
                         "margins"}, form
    conf = {**form, "candidate": "v2", "steps": [10, 50], "hold_min_duration": "20s", "hold_min_samples": 150}
    created = requests.post(f"{stack.api}/api/v2/dags/{DAG_ID}/dagRuns", headers=headers, timeout=15,
                            json={"logical_date": None, "conf": conf, "note": "stack test"})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]
    assert created.json()["conf"] == conf and created.json()["run_type"] == "manual"

    # Followed through the API only, as a client script would. The whole module stays under 6 minutes.
    started = time.monotonic()
    run: dict = {}
    while time.monotonic() - started < RUN_TIMEOUT:
        stack.group.check_running()
        run = _get(stack, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed"):
            break
        time.sleep(3)
    elapsed = time.monotonic() - started
    tasks = {ti["task_id"]: ti for ti in _get(
        stack, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", limit=100).json()["task_instances"]}
    states = {task_id: ti["state"] for task_id, ti in tasks.items() if ti["state"] != "skipped"}
    records = _decision_records(stack, token, run_id, tasks)
    last_records = {task_id: found[-1] for task_id, found in records.items() if found}
    outcome = (f"run {run_id} is {run.get('state')} after {elapsed:.0f}s (limit {RUN_TIMEOUT}s); "
               f"tasks not skipped: {states}\n"
               + "\n\n".join(f"--- last decision record in {t} ---\n{r}" for t, r in last_records.items()))
    errors = _errors(stack, token, run_id, tasks)
    if errors:
        outcome += "\n--- exceptions in task logs ---\n" + errors

    assert run["state"] == "success", outcome
    for task_id in ("validate", "preflight", "promote", "post_deploy_hold", "drift_check", "report"):
        assert states.get(task_id) == "success", outcome
    assert "rollback" not in states, outcome
    # The decision record is in the task log, readable through the API: the last look said PROMOTE.
    assert last_records, outcome
    assert "DECISION: PROMOTE" in list(last_records.values())[-1], outcome

    # The gateway now serves the candidate as stable, no canary share, and the registry says so.
    route = requests.get(f"{stack.gateway}/v1/models/{MODEL}/route", timeout=5).json()
    assert route["stable"] == "v2" and route["canary_percent"] == 0, route
    assert route["generation"] > route_before["generation"], route
    version = requests.get(f"{stack.gateway}/v1/models/{MODEL}/versions/v2", timeout=5).json()
    assert version["stage"] == "production", version

    # The HTML report the run wrote, found through the report task's XCom.
    xcom = _get(stack, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/xcomEntries/"
                "return_value")
    assert xcom.status_code == 200, xcom.text
    value = xcom.json()["value"]
    report = Path((json.loads(value) if isinstance(value, str) else value)["path"])
    assert report.parent == stack.home / "reports" and report.is_file(), report
    assert "<html" in report.read_text()[:2000].lower()

    # No secret in what the API shows of the run.
    shown = json.dumps(records) + json.dumps(tasks)
    assert stack.gateway_token not in shown and stack.admin_password not in shown
