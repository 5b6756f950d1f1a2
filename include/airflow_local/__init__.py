"""``python -m airflow_local``: Airflow standalone with the model gateway and simulated traffic (``make airflow``)."""
