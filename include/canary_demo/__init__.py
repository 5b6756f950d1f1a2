"""The main job of the project: one command that sets up a local stack and runs two real rollouts.

``python -m canary_demo`` (``make demo``) migrates an Airflow home under ``var/airflow``, trains the demo
models into ``var/models``, starts the real model gateway on 127.0.0.1 with a SQLite prediction log
(``var/predictions.db``) and a random admin token, sends simulated traffic with label feedback, and runs
two rollouts of the ``fraud`` model with ``dag.test()`` and hold windows of seconds:

1. a good candidate, expected to be promoted;
2. a worse candidate, expected to be rolled back with its reason.

It prints the decisions, the reasons, the final route and where the HTML reports are, and exits non-zero
when an outcome is not the expected one. See ``docs/demo.md``.
"""
