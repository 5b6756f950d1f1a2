"""Canary rollout DAGs: one Airflow DAG per rollout spec, ``canary_rollout__<model>``.

Each YAML file in ``include/rollouts/`` (or in ``$CANARY_ROLLOUTS_DIR``) becomes one DAG built by
``canary.dag_factory``. A spec that does not validate becomes a placeholder DAG of the same id that shows
the error (description, docs and a failing ``spec_error`` task); the other rollout DAGs load as usual.

This file is parse-time code: no pandas, scipy, Great Expectations, network or database here.
"""

from __future__ import annotations

from canary.dag_factory import build_dags, rollouts_dir

for _dag_id, _dag in build_dags(rollouts_dir(__file__)).items():
    globals()[_dag_id] = _dag
