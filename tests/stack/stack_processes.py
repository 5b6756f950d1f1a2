"""Run the docker-compose services as plain processes on loopback, for tests/stack.

Each process gets the command its compose service runs (``command:``, through the Airflow image's entrypoint
rule) and the environment its service gets, with only the deployment-specific values replaced: container paths
become temp paths, service host names become 127.0.0.1 and free ports, PostgreSQL for Airflow's metadata
becomes a SQLite file. Everything else (executor, auth manager, JWT secret shared by every Airflow process,
connections) comes from docker-compose.yml, so a change there changes what this test runs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stack_compose import REPO, airflow_argv, command_argv, environment, interpolate

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with the value after ``option`` replaced; raises if the compose command lacks the option."""
    if option not in argv:
        raise AssertionError(f"the compose command {argv} has no {option}; the stack test expects one")
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def local_executable(argv: list[str]) -> list[str]:
    """``python``/``airflow`` of the image → this test's interpreter and its ``airflow`` script."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "airflow":
        return [str(VENV_BIN / "airflow"), *argv[1:]]
    return argv


@dataclass
class Process:
    """One started service.

    :param name: the compose service name.
    :param argv: what was started.
    :param log: file holding its stdout and stderr.
    :param popen: the process (leader of its own process group).
    """

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    def tail(self, lines: int = 15) -> str:
        """The last lines of its output, for failure messages."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text[-lines:])


@dataclass
class ProcessGroup:
    """Processes started by a test; :meth:`stop_all` ends each one's process group (never anything else)."""

    workdir: Path
    processes: dict[str, Process] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Process:
        log = self.workdir / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(argv, env=dict(env), cwd=self.workdir, stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        handle.close()
        process = Process(name, argv, log, popen)
        self.processes[name] = process
        return process

    def check_running(self) -> None:
        """Raise naming any process that exited, with its output."""
        for process in self.processes.values():
            if process.popen.poll() is not None:
                raise AssertionError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every started process group at once, wait up to ``grace`` seconds, then SIGKILL the groups
        (LocalExecutor task processes and uvicorn workers share their parent's group, so none is left)."""
        for process in self.processes.values():
            if process.popen.poll() is None:
                _signal_group(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes.values():
            _signal_group(process.popen.pid, signal.SIGKILL)
            if process.popen.poll() is None:
                process.popen.wait(timeout=10)

    def report(self) -> str:
        return "\n\n".join(f"--- {p.name} ({p.popen.poll()}) ---\n{p.tail()}" for p in self.processes.values())


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group this test created with start_new_session for that process
    except ProcessLookupError:
        pass


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 1.0, what: str,
             group: ProcessGroup | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` and the process output."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if group is not None:
            group.check_running()
        try:
            result = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling; reported on timeout
            last_error = exc
            result = None
        if result:
            return result
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    report = f"\n{group.report()}" if group is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{report}")


@dataclass(frozen=True)
class LocalPorts:
    """Free loopback ports standing in for the compose services' ports."""

    api: int = field(default_factory=free_port)
    scheduler_health: int = field(default_factory=free_port)
    gateway: int = field(default_factory=free_port)


def airflow_environment(compose_service: Mapping[str, Any], values: Mapping[str, str], *, home: Path,
                        ports: LocalPorts, prediction_log: Mapping[str, Any],
                        rollouts_dir: Path) -> dict[str, str]:
    """The Airflow service's compose environment, interpolated with ``values``, made local.

    Only the keys in ``local`` below change; each must exist in the compose environment, so this cannot
    silently invent settings the compose stack does not have.
    """
    env = {key: interpolate(value, values) for key, value in environment(compose_service).items()}
    gateway_conn = json.loads(env["AIRFLOW_CONN_CANARY_GATEWAY"])
    gateway_conn.update(host="127.0.0.1", port=ports.gateway)
    log_conn = json.loads(env["AIRFLOW_CONN_CANARY_PREDICTION_LOG"])
    log_conn.update(prediction_log)
    local = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{ports.api}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(ports.api),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports.api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "auth" / "passwords.json"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(ports.scheduler_health),
        "AIRFLOW_CONN_CANARY_GATEWAY": json.dumps(gateway_conn),
        "AIRFLOW_CONN_CANARY_PREDICTION_LOG": json.dumps(log_conn),
        "CANARY_ROLLOUTS_DIR": str(rollouts_dir),
        "CANARY_EXPECTATIONS_DIR": str(REPO / "include" / "expectations"),  # the image's copy of include/
        "CANARY_REPORT_DIR": str(home / "reports"),
        "PYTHONPATH": f"{REPO / 'include'}:{REPO / 'plugins'}",
    }
    unknown = set(local) - set(env)
    assert not unknown, f"the compose Airflow environment lacks {sorted(unknown)}"
    env.update(local)
    # What the image provides and a plain process needs: a home, the venv first on PATH, loopback only.
    env.update(
        AIRFLOW_HOME=str(home),
        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        HOME=os.environ.get("HOME", str(home)),
        LANG="C.UTF-8",
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="127.0.0.1",
    )
    return env


def run_healthcheck(test: list[str], env: Mapping[str, str], substitutions: Mapping[str, str],
                    timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a compose ``healthcheck.test`` here, with URLs/hosts mapped by ``substitutions``."""
    kind, *rest = test

    def local(text: str) -> str:
        text = text.replace("$$", "$")
        for old, new in substitutions.items():
            text = text.replace(old, new)
        return text

    if kind == "CMD-SHELL":
        argv = ["bash", "-c", local(" ".join(rest))]
    elif kind == "CMD":
        argv = local_executable([local(part) for part in rest])
    else:
        raise AssertionError(f"unsupported healthcheck {test}")
    return subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)


def describe(argv: list[str]) -> str:
    return shlex.join(argv)


__all__ = [
    "LocalPorts",
    "ProcessGroup",
    "airflow_argv",
    "airflow_environment",
    "command_argv",
    "describe",
    "free_port",
    "local_executable",
    "replace_option",
    "run_healthcheck",
    "wait_for",
]
