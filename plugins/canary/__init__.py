"""canary: progressive (canary) rollouts of ML models on Apache Airflow 3.

The package Airflow finds on ``sys.path`` through ``plugins/``. Its parts, by role:

- :mod:`canary.spec`: rollout specs (YAML) and trigger params, validated into frozen dataclasses.
- :mod:`canary.dag_factory`: one DAG per spec, ``canary_rollout__<model>`` (used by ``dags/``).
- :mod:`canary.runtime`: the body of every task of a rollout run.
- :mod:`canary.analysis`: the pure decision engine (the judge); :mod:`canary.hooks`, ``operators``,
  ``sensors``, ``triggers``: the Airflow shell around it.

Importing ``canary`` imports nothing else: DAG files pay only for the modules they use.
"""

__all__: list[str] = []
