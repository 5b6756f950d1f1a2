"""Reading the compose file the way docker-compose does, for the stack tests.

Only the subset this project uses: YAML with merge keys, and ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``
interpolation (``$$`` is a literal ``$``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"

AIRFLOW_SERVICES = ("airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer")
LONG_RUNNING = ("postgres", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "gateway", "simulator")
ONE_SHOT = ("airflow-init", "demo-models")
ALL_SERVICES = LONG_RUNNING + ONE_SHOT

REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def load_compose() -> dict[str, Any]:
    """The compose file as a dict (merge keys resolved, no interpolation)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute ``${...}`` references like docker-compose; a missing ``:?`` variable raises KeyError."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return REFERENCE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a list of NAME=value)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_argv(service: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """The service's command as argv after interpolation (string commands are split like compose does)."""
    command = service["command"]
    if isinstance(command, str):
        return shlex.split(interpolate(command, env))
    return [interpolate(str(part), env) for part in command]


def airflow_argv(argv: list[str]) -> list[str]:
    """What the official Airflow image's entrypoint runs for a command: ``python ...`` and ``bash ...`` as
    given, ``airflow ...`` as given, anything else as ``airflow <command>``."""
    if argv and argv[0] in ("python", "bash", "airflow"):
        return argv
    return ["airflow", *argv]
