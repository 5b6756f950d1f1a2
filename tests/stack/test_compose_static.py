"""Static checks of the production stack: docker-compose.yml, .env.example, Dockerfile.

No Docker engine runs here, so these tests read the files: every service present, mounts, environment,
connections, health checks, start order, no secret literals; and Debian's ``docker-compose config`` (v1.29)
validates the file against the compose schema when the binary is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from stack_compose import (
    AIRFLOW_SERVICES,
    ALL_SERVICES,
    COMPOSE_FILE,
    DOCKERFILE,
    ENV_EXAMPLE,
    LONG_RUNNING,
    ONE_SHOT,
    REFERENCE,
    REPO,
    command_argv,
    environment,
    interpolate,
    load_compose,
    read_env_file,
)

SECRET_VARS = ("POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY",
               "AIRFLOW_FERNET_KEY", "CANARY_GATEWAY_TOKEN")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET", re.IGNORECASE)
WHOLE_REFERENCE = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?[^}]+\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def test_every_service_is_present_and_the_simulator_is_in_a_profile(services):
    assert sorted(services) == sorted(ALL_SERVICES)
    assert services["simulator"].get("profiles") == ["simulator"]
    for name in ALL_SERVICES:
        if name != "simulator":
            assert not services[name].get("profiles"), f"{name} must start with a plain `docker-compose up`"


def test_airflow_services_share_image_mounts_executor_and_one_jwt_secret(services):
    secrets_seen = set()
    for name in AIRFLOW_SERVICES:
        service = services[name]
        env = environment(service)
        assert service["image"] == services["airflow-api-server"]["image"]
        assert service["build"] == "."
        mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in service["volumes"]}
        for folder in ("dags", "plugins", "include"):
            assert mounts.get(f"./{folder}") == f"/opt/airflow/{folder}", f"{name} must mount ./{folder}"
        assert mounts.get("airflow-logs") == "/opt/airflow/logs", f"{name}: task logs shared with the api-server"
        assert mounts.get("airflow-auth") == "/opt/airflow/auth", f"{name}: the admin password file"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"
        assert env["PYTHONPATH"] == "/opt/airflow/include:/opt/airflow/plugins"
        assert env["GX_ANALYTICS_ENABLED"] == "False"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("simple_auth_manager.SimpleAuthManager")
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith("/opt/airflow/auth/")
        secrets_seen.add(env["AIRFLOW__API_AUTH__JWT_SECRET"])
        assert WHOLE_REFERENCE.match(env["AIRFLOW__API_AUTH__JWT_SECRET"])["name"] == "AIRFLOW_JWT_SECRET"
        assert WHOLE_REFERENCE.match(env["AIRFLOW__API__SECRET_KEY"])["name"] == "AIRFLOW_SECRET_KEY"
        assert WHOLE_REFERENCE.match(env["AIRFLOW__CORE__FERNET_KEY"])["name"] == "AIRFLOW_FERNET_KEY"
    assert len(secrets_seen) == 1, "every Airflow service must use the same JWT secret"


def test_connections_are_json_airflow_conn_variables_matching_the_specs(services, example_env):
    env = environment(services["airflow-scheduler"])
    gateway = json.loads(interpolate(env["AIRFLOW_CONN_CANARY_GATEWAY"], example_env))
    assert gateway == {"conn_type": "http", "host": "gateway", "port": 8808, "schema": "http",
                       "password": example_env["CANARY_GATEWAY_TOKEN"]}
    log = json.loads(interpolate(env["AIRFLOW_CONN_CANARY_PREDICTION_LOG"], example_env))
    assert log == {"conn_type": "postgres", "host": "postgres", "port": 5432, "schema": "predictions",
                   "login": example_env["POSTGRES_USER"], "password": example_env["POSTGRES_PASSWORD"]}
    # The gateway listens where the connection points, and the prediction-log database is the one created.
    assert command_argv(services["gateway"], example_env)[-4:] == ["--host", "0.0.0.0", "--port", "8808"]
    assert environment(services["postgres"])["CANARY_PREDICTION_DB"] == log["schema"]
    # Every connection a rollout spec names is defined for the Airflow services.
    defined = {key.removeprefix("AIRFLOW_CONN_").lower() for key in env if key.startswith("AIRFLOW_CONN_")}
    specs = sorted((REPO / "include" / "rollouts").glob("*.yaml"))
    for spec in specs:
        connections = (yaml.safe_load(spec.read_text()) or {}).get("connections") or {}
        for role in ("router", "prediction_log"):
            conn_id = connections.get(role, f"canary_{'gateway' if role == 'router' else role}")
            assert conn_id in defined, f"{spec.name}: connections.{role}={conn_id!r} has no AIRFLOW_CONN_ variable"


def test_every_long_running_service_has_a_health_check_and_one_shots_do_not_restart(services):
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} needs a healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}.healthcheck.{key}"
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no", f"{name} runs once; restarting it would loop"


def test_start_order_waits_for_health_and_for_the_one_shots(services):
    def needs(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert needs("airflow-init") == {"postgres": "service_healthy"}
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert needs(name)["postgres"] == "service_healthy"
        assert needs(name)["airflow-init"] == "service_completed_successfully"
    assert needs("airflow-scheduler")["airflow-api-server"] == "service_healthy"  # tasks call its execution API
    assert needs("gateway")["demo-models"] == "service_completed_successfully"
    assert needs("gateway")["postgres"] == "service_healthy"
    assert needs("simulator") == {"gateway": "service_healthy"}
    # The simulator only sends to loopback: it lives in the gateway's network namespace.
    assert services["simulator"]["network_mode"] == "service:gateway"
    assert "--url http://127.0.0.1:8808" in services["simulator"]["command"]
    # No cycles, no unknown services.
    seen: dict[str, int] = {}

    def depth(name: str, path: tuple[str, ...] = ()) -> int:
        assert name in services, f"depends_on names unknown service {name!r}"
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name not in seen:
            seen[name] = 1 + max((depth(dep, (*path, name)) for dep in needs(name)), default=0)
        return seen[name]

    for name in services:
        depth(name)


def _strings(node) -> list[str]:
    """Every string value in the parsed compose file (``$$``, a literal dollar for the container, removed)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [str(node).replace("$$", "")] if node is not None else []


def test_no_secret_literals_in_the_compose_file(compose, services):
    text = "\n".join(_strings(compose))
    # 1. Every variable that names a secret is a required reference (no default value to fall back on).
    for match in REFERENCE.finditer(text):
        if match["name"] in SECRET_VARS:
            assert match["op"] == ":?", f"${{{match['name']}}} must be written ${{{match['name']}:?...}}"
    # 2. Every secret-named environment entry is exactly one such reference.
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # a path to a secret is no secret
                assert WHOLE_REFERENCE.match(value), f"{name}: {key} must come from .env, got {value!r}"
    # 3. Passwords inside connection JSON and URLs are references to a secret variable too.
    marked = REFERENCE.sub(lambda match: f"<ref={match['name']}>", text)
    secret_ref = re.compile(rf"^<ref=({'|'.join(SECRET_VARS)})>$")
    for match in re.finditer(r'"password":\s*"([^"]*)"', marked):
        assert secret_ref.match(match[1]), f"literal password in a connection: {match[0]!r}"
    for match in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", marked):
        assert secret_ref.match(match[2]), f"literal password in a URL: {match[0]!r}"
    # 4. None of the example's secret values was pasted into the file.
    raw = COMPOSE_FILE.read_text()
    for name, value in read_env_file(ENV_EXAMPLE).items():
        if name in SECRET_VARS:
            assert value not in raw


def test_env_example_has_placeholders_and_dot_env_is_never_committed(example_env):
    for name in SECRET_VARS:
        assert "change-me" in example_env[name], f"{name} in .env.example must be a change-me placeholder"
    referenced = {match["name"] for match in REFERENCE.finditer("\n".join(_strings(load_compose())))}
    assert referenced <= set(example_env), f"missing from .env.example: {sorted(referenced - set(example_env))}"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env"], cwd=REPO, capture_output=True,
                             check=False)
    assert tracked.returncode != 0, ".env is tracked by git: remove it from the index and rotate its secrets"


def test_dockerfile_builds_on_airflow_3_3_python_3_11_with_the_pinned_requirements():
    text = DOCKERFILE.read_text()
    image = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)$", text, re.MULTILINE)[1]
    assert image == "apache/airflow:3.3.2-python3.11"
    assert re.search(r"^FROM \$\{AIRFLOW_IMAGE\}$", text, re.MULTILINE)
    pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.startswith("apache-airflow=="))
    assert pin == "apache-airflow==" + image.split(":")[1].split("-")[0], "image and requirements disagree"
    install = re.search(r"pip install(?:[^\n]*\\\n)*[^\n]*", text)[0]
    assert "-r /opt/airflow/requirements/requirements.txt" in install
    assert "-c /opt/airflow/requirements/constraints.txt" in install
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install  # never up- or downgrades the image's Airflow
    for folder in ("dags", "plugins", "include"):
        assert re.search(rf"^COPY --chown=airflow:0 {folder}/ /opt/airflow/{folder}/$", text, re.MULTILINE)
    for match in re.finditer(r"^(?:ENV|ARG)\s+(.*)$", text.replace("\\\n", " "), re.MULTILINE):
        assert not SECRET_NAME.search(match[1]), f"a secret must not be baked into the image: {match[0]!r}"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ".env" in ignore and ".git" in ignore and ".venv" in ignore


DOCKER_COMPOSE = shutil.which("docker-compose")
needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="Debian's docker-compose binary is not installed (apt-get install docker-compose; .ci/run does)",
)


def _docker_compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    # Only PATH and HOME from the caller: a secret exported in the shell would otherwise mask a missing one.
    env = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    return subprocess.run([DOCKER_COMPOSE, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE),
                           "--env-file", str(env_file), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


@needs_docker_compose
def test_docker_compose_config_accepts_the_file_with_the_example_env(example_env):
    result = _docker_compose("--profile", "simulator", "config", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert sorted(rendered["services"]) == sorted(ALL_SERVICES)
    scheduler_env = rendered["services"]["airflow-scheduler"]["environment"]
    assert scheduler_env["AIRFLOW__API_AUTH__JWT_SECRET"] == example_env["AIRFLOW_JWT_SECRET"]
    assert rendered["services"]["simulator"]["profiles"] == ["simulator"]


@needs_docker_compose
def test_docker_compose_config_refuses_a_missing_secret_and_names_it(tmp_path, example_env):
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in example_env.items() if k != "CANARY_GATEWAY_TOKEN"))
    result = _docker_compose("config", env_file=partial)
    assert result.returncode != 0
    assert "set CANARY_GATEWAY_TOKEN in .env" in result.stderr


def test_health_checks_probe_the_ports_the_services_listen_on(services, example_env):
    def probe(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"][1:])

    env = environment(services["airflow-api-server"])
    assert f"http://localhost:{env['AIRFLOW__API__PORT']}/api/v2/monitor/health" in probe("airflow-api-server")
    assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    port = env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"]
    assert f"http://localhost:{port}/health" in probe("airflow-scheduler")
    assert "--job-type DagProcessorJob --local" in probe("airflow-dag-processor")
    assert "--job-type TriggererJob --local" in probe("airflow-triggerer")
    gateway_port = command_argv(services["gateway"], example_env)[-1]
    assert f"http://localhost:{gateway_port}/healthz" in probe("gateway")
    assert f"http://127.0.0.1:{gateway_port}/healthz" in probe("simulator")
    assert services["airflow-api-server"]["ports"] == ["127.0.0.1:${AIRFLOW_API_PORT:-8080}:" + env["AIRFLOW__API__PORT"]]
    assert services["gateway"]["ports"] == [f"127.0.0.1:${{GATEWAY_PORT:-8808}}:{gateway_port}"]
    assert "--dbname \"$${CANARY_PREDICTION_DB}\"" in probe("postgres") and "--host 127.0.0.1" in probe("postgres")
