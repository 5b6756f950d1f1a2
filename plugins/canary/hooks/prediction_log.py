"""PredictionLogHook: the prediction log (Contract 2) through an Airflow Connection, SQLite and PostgreSQL alike.

Connections (common-sql conventions):

- ``sqlite``: ``host`` is the database file path, e.g.
  ``AIRFLOW_CONN_CANARY_PREDICTION_LOG='{"conn_type": "sqlite", "host": "/srv/canary/predictions.db"}'``
- ``postgres``: ``host``, ``port``, ``login``, ``password`` and ``schema`` (the database name), e.g.
  ``'{"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "schema": "canary"}'``

``extra.sqlalchemy_url`` may give a full SQLAlchemy URL instead (its password is never logged). The hook hands
its SQLAlchemy engine to the aggregation functions in ``canary.analysis.sql`` so the heavy lifting runs in the
database. Every query is parameterized.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from airflow.sdk import BaseHook
from sqlalchemy.engine import URL, Engine

from canary.hooks.timeutil import to_naive_utc

_SQLITE_TYPES = frozenset({"sqlite"})
_POSTGRES_TYPES = frozenset({"postgres", "postgresql"})


class PredictionLogError(Exception):
    """The prediction log connection is missing, mis-configured or unreachable."""


class PredictionLogHook(BaseHook):
    """SQLAlchemy access to the ``predictions`` and ``feedback`` tables.

    :param prediction_log_conn_id: Airflow connection id (default ``canary_prediction_log``).
    :param engine_kwargs: extra keyword arguments for ``sqlalchemy.create_engine``.
    """

    conn_name_attr = "prediction_log_conn_id"
    default_conn_name = "canary_prediction_log"
    conn_type = "sqlite"
    hook_name = "Canary prediction log"

    def __init__(
        self,
        prediction_log_conn_id: str = default_conn_name,
        *,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.prediction_log_conn_id = prediction_log_conn_id
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine: Engine | None = None

    # -- connection -----------------------------------------------------------------------------------

    @property
    def sqlalchemy_url(self) -> URL:
        """The SQLAlchemy URL built from the Airflow Connection."""
        conn = self.get_connection(self.prediction_log_conn_id)
        extra = conn.extra_dejson or {}
        if conn.password:
            _mask(conn.password)
        if extra.get("sqlalchemy_url"):
            url = sa.make_url(str(extra["sqlalchemy_url"]))
            if url.password:
                _mask(str(url.password))
            return url
        ctype = (conn.conn_type or "").lower()
        if ctype in _SQLITE_TYPES:
            path = (conn.host or "").strip()
            if not path:
                raise PredictionLogError(
                    f"connection {self.prediction_log_conn_id!r} (sqlite) has no host: set host to the "
                    "prediction log file path, e.g. /srv/canary/predictions.db"
                )
            return URL.create("sqlite", database=path)
        if ctype in _POSTGRES_TYPES:
            if not conn.host:
                raise PredictionLogError(
                    f"connection {self.prediction_log_conn_id!r} (postgres) has no host: set host, port, "
                    "login, password and schema (the database name)"
                )
            return URL.create(
                "postgresql+psycopg2",
                username=conn.login or None,
                password=conn.password or None,
                host=conn.host,
                port=int(conn.port) if conn.port else None,
                database=conn.schema or None,
            )
        raise PredictionLogError(
            f"connection {self.prediction_log_conn_id!r} has conn_type {conn.conn_type!r}; the prediction "
            "log supports 'sqlite' (host = file path) and 'postgres', or extra.sqlalchemy_url"
        )

    def get_uri(self) -> str:
        """The connection URL with the password hidden (safe to log)."""
        return self.sqlalchemy_url.render_as_string(hide_password=True)

    def get_sqlalchemy_engine(self, engine_kwargs: dict[str, Any] | None = None) -> Engine:
        """A cached SQLAlchemy engine for the prediction log (common-sql's method name)."""
        if self._engine is None:
            url = self.sqlalchemy_url
            kwargs = {"pool_pre_ping": True, **self.engine_kwargs, **(engine_kwargs or {})}
            if url.get_backend_name() == "sqlite":
                kwargs.setdefault("connect_args", {"timeout": 30})
            self._engine = sa.create_engine(url, **kwargs)
        return self._engine

    @property
    def engine(self) -> Engine:
        """Shorthand for :meth:`get_sqlalchemy_engine`."""
        return self.get_sqlalchemy_engine()

    def get_conn(self) -> Any:
        """A raw DB-API connection (common-sql idiom); prefer :attr:`engine` for queries."""
        return self.engine.raw_connection()

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's connection test: the database answers and holds the ``predictions`` table."""
        try:
            with self.engine.connect() as db:
                has = sa.inspect(db).has_table("predictions")
        except Exception as exc:  # noqa: BLE001 - reported to the user, not swallowed
            return False, f"prediction log {self.get_uri()} is not reachable: {exc}"
        if not has:
            return False, f"prediction log {self.get_uri()} has no 'predictions' table yet (start the gateway)"
        return True, f"prediction log {self.get_uri()} is reachable"

    # -- small reads the shell needs (the heavy aggregation is canary.analysis.sql) -------------------

    def arm_counts(
        self,
        model: str,
        *,
        stable: str,
        canary: str,
        start: datetime,
        end: datetime,
        label_cutoff: datetime | None = None,
    ) -> dict[str, dict[str, int]]:
        """Requests per arm in ``[start, end)``, and labelled requests whose label had time to arrive.

        :param label_cutoff: only predictions made before this time count as matured labelled samples
            (``end - label_delay``); None skips the label count.
        :return: ``{"stable": {"requests": n, "errors": e, "labelled": m}, "canary": {...}}``.
        """
        params = {
            "model": model,
            "stable": stable,
            "canary": canary,
            "start": to_naive_utc(start),
            "end": to_naive_utc(end),
        }
        arms = "((p.arm = 'stable' AND p.version = :stable) OR (p.arm = 'canary' AND p.version = :canary))"
        requests_sql = sa.text(
            "SELECT p.arm, COUNT(*), SUM(CASE WHEN p.status = 'error' THEN 1 ELSE 0 END) FROM predictions p "
            f"WHERE p.model = :model AND {arms} AND p.ts >= :start AND p.ts < :end GROUP BY p.arm"
        ).bindparams(sa.bindparam("start", type_=sa.DateTime()), sa.bindparam("end", type_=sa.DateTime()))
        out = {arm: {"requests": 0, "errors": 0, "labelled": 0} for arm in ("stable", "canary")}
        with self.engine.connect() as db:
            for arm, n, errors in db.execute(requests_sql, params):
                out[str(arm)]["requests"] = int(n)
                out[str(arm)]["errors"] = int(errors or 0)
            if label_cutoff is not None:
                cutoff = min(to_naive_utc(label_cutoff), params["end"])
                label_sql = sa.text(
                    "SELECT p.arm, COUNT(DISTINCT p.request_id) FROM predictions p JOIN feedback f "
                    f"ON f.request_id = p.request_id WHERE p.model = :model AND {arms} "
                    "AND p.ts >= :start AND p.ts < :cutoff AND f.ts < :end GROUP BY p.arm"
                ).bindparams(
                    sa.bindparam("start", type_=sa.DateTime()),
                    sa.bindparam("end", type_=sa.DateTime()),
                    sa.bindparam("cutoff", type_=sa.DateTime()),
                )
                for arm, n in db.execute(label_sql, {**params, "cutoff": cutoff}):
                    out[str(arm)]["labelled"] = int(n)
        return out

    def version_count(self, model: str, *, version: str, start: datetime, end: datetime) -> int:
        """Requests answered by ``version`` of ``model`` (any arm) in ``[start, end)``."""
        sql = sa.text(
            "SELECT COUNT(*) FROM predictions WHERE model = :model AND version = :version "
            "AND ts >= :start AND ts < :end"
        ).bindparams(sa.bindparam("start", type_=sa.DateTime()), sa.bindparam("end", type_=sa.DateTime()))
        with self.engine.connect() as db:
            return int(
                db.execute(
                    sql,
                    {"model": model, "version": version, "start": to_naive_utc(start), "end": to_naive_utc(end)},
                ).scalar_one()
            )


    def window_rows(
        self,
        model: str,
        *,
        start: datetime,
        end: datetime,
        versions: dict[str, str] | None = None,
        with_labels: bool = False,
        with_features: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Logged requests of ``model`` in ``[start, end)``, newest first (a bounded sample with ``limit``).

        :param versions: ``{arm: version}`` to keep, e.g. ``{"stable": "v1", "canary": "v2"}``; None keeps
            every arm and version.
        :param with_labels: add ``label`` (the first feedback that arrived before ``end``, else None).
        :param with_features: add ``features`` (the JSON text as logged).
        :param limit: most rows returned: when the window holds more, the ``limit`` rows with the smallest
            sample key (``canary.analysis.sql.sample_rows``'s: a hash of the request id on PostgreSQL, a
            Weyl sequence over the rowid on SQLite), so the sample is spread over the whole window and the
            same on a retry, not its newest rows (which would judge a step by its last minutes).
        """
        params: dict[str, Any] = {"model": model, "start": to_naive_utc(start), "end": to_naive_utc(end)}
        where = ["p.model = :model", "p.ts >= :start", "p.ts < :end"]
        if versions:
            ors = []
            for k, (arm, version) in enumerate(sorted(versions.items())):
                params[f"arm{k}"], params[f"ver{k}"] = arm, version
                ors.append(f"(p.arm = :arm{k} AND p.version = :ver{k})")
            where.append("(" + " OR ".join(ors) + ")")
        cols = ["p.request_id", "p.ts", "p.version", "p.arm", "p.unit_id", "p.prediction", "p.score",
                "p.latency_ms", "p.status"]
        if with_features:
            cols.append("p.features")
        if with_labels:
            cols.append(
                "(SELECT f.label FROM feedback f WHERE f.request_id = p.request_id AND f.ts < :end "
                "ORDER BY f.ts LIMIT 1) AS label"
            )
        cond = " AND ".join(where)
        times = (sa.bindparam("start", type_=sa.DateTime()), sa.bindparam("end", type_=sa.DateTime()))
        with self.engine.connect() as db:
            if limit is None:
                sql = f"SELECT {', '.join(cols)} FROM predictions p WHERE {cond} ORDER BY p.ts DESC"
            else:  # the sample's request ids first, then their columns (labels are looked up for those only)
                from canary.analysis.sql import _sample_key, sample_key_cut

                key = _sample_key(self.engine.dialect.name)
                # as sql.sample_rows: count the window (an index range), then sort only the rows whose key is
                # below the cut, not the whole window
                count = sa.text(f"SELECT COUNT(*) FROM predictions p WHERE {cond}").bindparams(*times)
                params["kmax"] = sample_key_cut(int(db.execute(count, params).scalar_one()), int(limit))
                params["limit"] = int(limit)
                sql = (f"SELECT {', '.join(cols)} FROM predictions p WHERE p.request_id IN (SELECT p.request_id "
                       f"FROM predictions p WHERE {cond} AND {key} < :kmax ORDER BY {key}, p.request_id "
                       f"LIMIT :limit) AND {cond} ORDER BY p.ts DESC")
            stmt = sa.text(sql).bindparams(*times).columns(ts=sa.DateTime())
            return [dict(row._mapping) for row in db.execute(stmt, params)]

def _mask(secret: str) -> None:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover
        return
    mask_secret(secret)
