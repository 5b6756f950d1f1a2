"""Test session set-up shared by every test: import paths and an isolated Airflow home.

Airflow reads its configuration when first imported, so the environment is set here, at the top of the
conftest, before any test module imports Airflow.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("tests", "plugins", "include"):  # tests/: helpers shared by test folders (pause_answer)
    p = str(REPO / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="canary-airflow-"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
# Subprocesses started by tests (gateway, simulator) import the same packages.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "include"), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)

PG_URL = os.environ.get("CANARY_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
