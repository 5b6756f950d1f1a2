"""A rollouts folder holding one spec, for tests that run the real DAG file with dag.test()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def rollouts_folder(tmp_path_factory: pytest.TempPathFactory, model: str, spec: str) -> Iterator[Path]:
    """For a module fixture (``yield from``): write ``<model>.yaml`` into a fresh folder, point the DAG file
    at it (dag.test() re-parses the DAG folder to serialize the DAG) and initialise Airflow's database;
    yields the spec's path."""
    from airflow.utils.db import initdb
    from canary import dag_factory

    folder = tmp_path_factory.mktemp("rollouts")
    (folder / f"{model}.yaml").write_text(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dag_factory.ROLLOUTS_DIR_ENV, str(folder))
        initdb()
        yield folder / f"{model}.yaml"
