"""One-shot set-up of an Airflow deployment: check the shared secrets, migrate the database, set the admin login.

Run as ``python -m stack.init_airflow`` (the ``airflow-init`` service of docker-compose, and the stack test).

1. Refuses to continue when a shared secret is missing, is the placeholder from ``.env.example`` or is too
   short: every Airflow service must sign and check JWTs with the same ``AIRFLOW__API_AUTH__JWT_SECRET``.
2. ``airflow db migrate`` (idempotent: safe on every start).
3. With the simple auth manager (Airflow 3's default, and this stack's choice), writes the admin user's password
   from ``AIRFLOW_ADMIN_PASSWORD`` into the auth manager's password file (mode 0600). Without this step the
   api-server would generate a random password and print it to its log. Other users already in the file keep
   their passwords; re-running with a new ``AIRFLOW_ADMIN_PASSWORD`` rotates the admin password.

The password is never printed. Exit code 0 on success, 2 on a configuration error (message on stderr names the
variable and the fix), the ``airflow db migrate`` exit code when the migration fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
PLACEHOLDER_MARK = "change-me"
FIX_HINT = "generate fresh values with `python -m stack.make_env --out .env` (see docs/deploy.md)"


class StackConfigError(ValueError):
    """A required setting of the stack is missing or unsafe; the message names the variable and the fix."""


@dataclass(frozen=True)
class SecretRule:
    """A secret the stack needs in the environment.

    :param env: the environment variable holding it.
    :param min_length: shortest accepted value (after stripping whitespace).
    :param purpose: what it is for, shown in the error message.
    """

    env: str
    min_length: int
    purpose: str


REQUIRED_SECRETS: tuple[SecretRule, ...] = (
    SecretRule("AIRFLOW__API_AUTH__JWT_SECRET", 32, "signs the JWTs shared by api-server, scheduler, workers"),
    SecretRule("AIRFLOW__API__SECRET_KEY", 32, "signs log-fetch requests between Airflow components"),
    SecretRule("AIRFLOW__CORE__FERNET_KEY", 44, "encrypts connection passwords in the metadata database"),
    SecretRule("AIRFLOW_ADMIN_PASSWORD", 12, "the password of the Airflow UI/API admin user"),
    SecretRule("CANARY_GATEWAY_TOKEN", 24, "the model gateway's admin token, sent by the DAGs"),
    SecretRule("POSTGRES_PASSWORD", 12, "the PostgreSQL password"),
)


def check_secrets(env: Mapping[str, str], rules: Sequence[SecretRule] = REQUIRED_SECRETS) -> None:
    """Raise :class:`StackConfigError` naming every secret that is missing, a placeholder, or too short."""
    problems = []
    for rule in rules:
        value = (env.get(rule.env) or "").strip()
        if not value:
            problems.append(f"{rule.env} is not set ({rule.purpose})")
        elif PLACEHOLDER_MARK in value:
            problems.append(f"{rule.env} still holds the placeholder from .env.example ({rule.purpose})")
        elif len(value) < rule.min_length:
            problems.append(
                f"{rule.env} is {len(value)} characters long; use at least {rule.min_length} ({rule.purpose})"
            )
    if problems:
        raise StackConfigError("; ".join(problems) + f". Fix: {FIX_HINT}.")


@dataclass(frozen=True)
class AdminLogin:
    """The admin account of the simple auth manager.

    :param username: must appear with role ``admin`` in ``[core] simple_auth_manager_users``.
    :param password: from ``AIRFLOW_ADMIN_PASSWORD``; never printed.
    :param passwords_file: the auth manager's password file (``[core] simple_auth_manager_passwords_file``).
    """

    username: str
    password: str
    passwords_file: Path


def parse_users(users_setting: str) -> dict[str, str]:
    """``"alice:admin,bob:viewer"`` → ``{"alice": "admin", "bob": "viewer"}`` (the format Airflow reads)."""
    users: dict[str, str] = {}
    for item in users_setting.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise StackConfigError(
                f"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS has the entry {item!r}; write it as "
                "'<username>:<role>' with role one of viewer, user, op, admin, e.g. 'admin:admin'."
            )
        users[parts[0]] = parts[1]
    return users


def admin_login(env: Mapping[str, str], users_setting: str, passwords_file: str) -> AdminLogin:
    """Resolve the admin account from the environment and Airflow's settings, or raise StackConfigError."""
    username = (env.get("AIRFLOW_ADMIN_USER") or "admin").strip()
    users = parse_users(users_setting)
    if users.get(username) != "admin":
        raise StackConfigError(
            f"AIRFLOW_ADMIN_USER={username!r} is not an admin in AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS "
            f"(got {users_setting!r}); add '{username}:admin' to that setting."
        )
    return AdminLogin(username=username, password=env["AIRFLOW_ADMIN_PASSWORD"], passwords_file=Path(passwords_file))


def write_password(login: AdminLogin) -> None:
    """Set the admin's password in the auth manager's JSON password file, atomically, with mode 0600."""
    path = login.passwords_file
    path.parent.mkdir(parents=True, exist_ok=True)
    passwords: dict[str, str] = {}
    if path.exists() and path.read_text().strip():
        try:
            passwords = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StackConfigError(
                f"{path} is not valid JSON ({exc}); delete it and run this again to recreate it."
            ) from exc
    passwords[login.username] = login.password
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwords-")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(json.dumps(passwords) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def airflow_command() -> list[str]:
    """The ``airflow`` CLI next to this interpreter, else on PATH, else ``python -m airflow``."""
    beside = Path(sys.executable).with_name("airflow")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("airflow")
    return [found] if found else [sys.executable, "-m", "airflow"]


def main(argv: Sequence[str] | None = None) -> int:
    """Check secrets, migrate the metadata database, set the admin password. Returns the exit code."""
    del argv  # no options: everything comes from the environment, like every other service of the stack
    env = dict(os.environ)
    try:
        check_secrets(env)
    except StackConfigError as exc:
        print(f"airflow-init: {exc}", file=sys.stderr)
        return 2

    print("airflow-init: migrating the Airflow metadata database (airflow db migrate)", flush=True)
    migrated = subprocess.run([*airflow_command(), "db", "migrate"], check=False)
    if migrated.returncode != 0:
        print(f"airflow-init: `airflow db migrate` failed with exit code {migrated.returncode}", file=sys.stderr)
        return migrated.returncode

    from airflow.configuration import conf  # after the checks: importing Airflow reads the whole config

    auth_manager = conf.get("core", "auth_manager")
    if auth_manager != SIMPLE_AUTH_MANAGER:
        print(f"airflow-init: auth manager is {auth_manager}; create its users with its own tools", flush=True)
        return 0
    try:
        from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

        login = admin_login(
            env,
            conf.get("core", "simple_auth_manager_users", fallback=""),
            SimpleAuthManager.get_generated_password_file(),
        )
        write_password(login)
    except StackConfigError as exc:
        print(f"airflow-init: {exc}", file=sys.stderr)
        return 2
    print(f"airflow-init: admin user {login.username!r} can log in (password from AIRFLOW_ADMIN_PASSWORD)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
