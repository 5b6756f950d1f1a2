"""The stack's own scripts: secret checks and admin password of airflow-init, the .env generator, and the
PostgreSQL init script (run against the real PostgreSQL of the test environment, in a uniquely named database).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from stack.init_airflow import (
    REQUIRED_SECRETS,
    AdminLogin,
    StackConfigError,
    admin_login,
    check_secrets,
    parse_users,
    write_password,
)
from stack.make_env import render
from stack_compose import ENV_EXAMPLE, REPO, read_env_file

GOOD = {rule.env: "x" * max(rule.min_length, 44) for rule in REQUIRED_SECRETS}


def test_check_secrets_accepts_long_random_values():
    check_secrets(GOOD)


def test_check_secrets_names_every_missing_placeholder_or_short_secret():
    env = dict(GOOD)
    del env["AIRFLOW__API_AUTH__JWT_SECRET"]
    env["CANARY_GATEWAY_TOKEN"] = "change-me-gateway-admin-token"
    env["AIRFLOW_ADMIN_PASSWORD"] = "short"
    with pytest.raises(StackConfigError) as err:
        check_secrets(env)
    message = str(err.value)
    assert "AIRFLOW__API_AUTH__JWT_SECRET is not set" in message
    assert "CANARY_GATEWAY_TOKEN still holds the placeholder" in message
    assert "AIRFLOW_ADMIN_PASSWORD is 5 characters long; use at least 12" in message
    assert "python -m stack.make_env" in message
    assert "short" not in message.replace("shortest", "")  # the value itself is never echoed


def test_users_setting_and_admin_resolution():
    assert parse_users("admin:admin, viewer1:viewer") == {"admin": "admin", "viewer1": "viewer"}
    with pytest.raises(StackConfigError, match="'<username>:<role>'"):
        parse_users("admin")
    env = {"AIRFLOW_ADMIN_USER": "viewer1", "AIRFLOW_ADMIN_PASSWORD": "p" * 20}
    with pytest.raises(StackConfigError, match="add 'viewer1:admin'"):
        admin_login(env, "admin:admin,viewer1:viewer", "/tmp/x.json")


def test_write_password_keeps_other_users_and_is_private(tmp_path):
    path = tmp_path / "auth" / "passwords.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"alice": "alice-generated"}))
    write_password(AdminLogin("admin", "first-password", path))
    write_password(AdminLogin("admin", "rotated-password", path))
    assert json.loads(path.read_text()) == {"alice": "alice-generated", "admin": "rotated-password"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["passwords.json"]  # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(StackConfigError, match="delete it and run this again"):
        write_password(AdminLogin("admin", "x" * 20, path))


def test_init_airflow_refuses_the_example_secrets_before_touching_the_database(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db"}
    example = read_env_file(ENV_EXAMPLE)
    env.update({"AIRFLOW__API_AUTH__JWT_SECRET": example["AIRFLOW_JWT_SECRET"],
                "AIRFLOW__API__SECRET_KEY": example["AIRFLOW_SECRET_KEY"],
                "AIRFLOW__CORE__FERNET_KEY": example["AIRFLOW_FERNET_KEY"],
                "AIRFLOW_ADMIN_PASSWORD": example["AIRFLOW_ADMIN_PASSWORD"],
                "CANARY_GATEWAY_TOKEN": example["CANARY_GATEWAY_TOKEN"],
                "POSTGRES_PASSWORD": example["POSTGRES_PASSWORD"]})
    result = subprocess.run([sys.executable, "-m", "stack.init_airflow"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "AIRFLOW__API_AUTH__JWT_SECRET still holds the placeholder" in result.stderr
    assert not (tmp_path / "airflow.db").exists()


def test_make_env_replaces_every_placeholder_with_fresh_secrets(tmp_path):
    first = read_env_file(_write(tmp_path / "a.env", render(ENV_EXAMPLE.read_text())))
    second = read_env_file(_write(tmp_path / "b.env", render(ENV_EXAMPLE.read_text())))
    example = read_env_file(ENV_EXAMPLE)
    assert set(first) == set(example)
    for name, value in example.items():
        if "change-me" in value:
            assert "change-me" not in first[name] and len(first[name]) >= 43
            assert first[name] != second[name], f"{name} must be random"
        else:
            assert first[name] == value
    check_secrets({"AIRFLOW__API_AUTH__JWT_SECRET": first["AIRFLOW_JWT_SECRET"],
                   "AIRFLOW__API__SECRET_KEY": first["AIRFLOW_SECRET_KEY"],
                   "AIRFLOW__CORE__FERNET_KEY": first["AIRFLOW_FERNET_KEY"],
                   "AIRFLOW_ADMIN_PASSWORD": first["AIRFLOW_ADMIN_PASSWORD"],
                   "CANARY_GATEWAY_TOKEN": first["CANARY_GATEWAY_TOKEN"],
                   "POSTGRES_PASSWORD": first["POSTGRES_PASSWORD"]})
    from cryptography.fernet import Fernet

    Fernet(first["AIRFLOW_FERNET_KEY"].encode())  # a valid Fernet key, or this raises


def test_make_env_cli_writes_a_private_file_and_will_not_overwrite(tmp_path):
    out = tmp_path / ".env"
    cmd = [sys.executable, "-m", "stack.make_env", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    secret = read_env_file(out)["CANARY_GATEWAY_TOKEN"]
    assert secret not in first.stdout + first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    assert read_env_file(out)["CANARY_GATEWAY_TOKEN"] == secret


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


INIT_SCRIPT = REPO / "include" / "stack" / "postgres-init" / "10-prediction-log.sh"


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (the PostgreSQL client) is not installed")
def test_postgres_init_script_creates_the_prediction_log_database_once():
    from conftest import PG_URL

    url = make_url(PG_URL)
    name = f"stack_predictions_{uuid.uuid4().hex[:10]}"
    env = {"PATH": os.environ["PATH"], "PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
           "POSTGRES_USER": url.username or "postgres", "POSTGRES_DB": url.database or "postgres",
           "CANARY_PREDICTION_DB": name}
    if url.password:
        env["PGPASSWORD"] = url.password
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        created = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True,
                                 timeout=60, check=False)
        assert created.returncode == 0, created.stderr
        assert f'created prediction-log database "{name}"' in created.stdout
        again = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert again.returncode == 0 and "already exists" in again.stdout
        with admin.connect() as conn:
            owner = conn.execute(text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :n"),
                                 {"n": name}).scalar_one()
        assert owner == env["POSTGRES_USER"]
        bad = subprocess.run(["bash", str(INIT_SCRIPT)], env={**env, "CANARY_PREDICTION_DB": 'x"; DROP'},
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and "CANARY_PREDICTION_DB" in bad.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
