"""Process entry points of the production stack (docker-compose) that are not Airflow or the gateway.

- ``python -m stack.init_airflow``: one-shot set-up of an Airflow deployment (``airflow db migrate`` and
  the simple auth manager's admin password from the environment). The ``airflow-init`` service runs it.
- ``python -m stack.make_env``: writes a ``.env`` file with fresh random secrets for docker-compose.
- ``postgres-init/``: scripts the PostgreSQL image runs once on an empty data directory (creates the
  prediction-log database next to Airflow's metadata database).

The same commands run as plain processes in ``tests/stack``, so what the compose file starts is tested here.
"""
