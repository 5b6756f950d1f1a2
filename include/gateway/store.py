"""The prediction log and the route table (Contract 2), through SQLAlchemy.

SQLite (WAL) by default, PostgreSQL by URL. Rows are written by one background thread in batches (one transaction
per batch, executemany); the request path only puts a row on a bounded queue. When the queue is full the
request waits (back-pressure) instead of dropping the row. `stop()` flushes every accepted row.

The gateway also keeps the optional row columns of Contract 2 (`label`, `label_ts`, `unit_first`) so a look
reads everything in one scan: the writer flags each unit's first request per (model, route generation, arm)
through the `unit_exposures` table and copies every feedback's label onto its prediction row when it is the
latest, both in the batch's transaction.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from gateway.routing import Route

log = logging.getLogger("gateway.store")

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("ts", DateTime(timezone=False), nullable=False),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("arm", Text, nullable=False),
    Column("unit_id", Text, nullable=True),
    Column("features", Text, nullable=False),
    Column("prediction", Double, nullable=True),
    Column("score", Double, nullable=True),
    Column("latency_ms", Double, nullable=False),
    Column("status", String(8), nullable=False),
    Column("error", Text, nullable=True),
    Index("ix_predictions_model_ts", "model", "ts"),
)

ROW_COLUMNS = ("label", "label_ts", "unit_first")

# `predictions` with the optional row columns, as the gateway writes it (its own MetaData: `create_schema(engine)`
# without `row_columns` keeps creating the base Contract 2 tables that analysis fixtures and benchmarks build on).
logged_predictions = Table(
    "predictions",
    MetaData(),
    *[Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in predictions.columns],
    Column("label", Double, nullable=True),
    Column("label_ts", DateTime(timezone=False), nullable=True),
    Column("unit_first", SmallInteger, nullable=True),
)

unit_exposures = Table(
    "unit_exposures",
    MetaData(),
    Column("model", Text, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("arm", Text, nullable=False),
    Column("unit_id", Text, nullable=False),
    PrimaryKeyConstraint("model", "generation", "arm", "unit_id", name="pk_unit_exposures"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("request_id", Text, nullable=False),
    Column("ts", DateTime(timezone=False), nullable=False),
    Column("label", Double, nullable=False),
    Column("correction", Double, nullable=True),
    Column("source", Text, nullable=True),
    Index("ix_feedback_request_id", "request_id"),
)

routes = Table(
    "routes",
    metadata,
    Column("model", Text, primary_key=True),
    Column("stable", Text, nullable=False),
    Column("canary", Text, nullable=True),
    Column("canary_percent", Double, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("lease_expires_at", DateTime(timezone=False), nullable=True),
    Column("salt", Text, nullable=False),
    Column("updated_at", DateTime(timezone=False), nullable=False),
)


def make_engine(db_url: str) -> Engine:
    """An engine for the log: SQLite gets WAL, NORMAL sync and a busy timeout; others a pre-pinged pool."""
    if db_url.startswith("sqlite"):
        engine = create_engine(db_url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(db_url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def create_schema(engine: Engine, row_columns: bool = False) -> None:
    """Create the three tables and their indexes when missing (safe to call on every start).

    With `row_columns` (the gateway) also the optional one-scan columns of Contract 2 on `predictions`, the
    `feedback(ts)` index and the `unit_exposures` table; on an existing log the columns are added and
    `label`/`label_ts` are filled from `feedback` in the same transaction (old rows keep `unit_first` NULL,
    which makes a look over them count distinct units instead).
    """
    metadata.create_all(engine, checkfirst=True)
    if row_columns:
        unit_exposures.create(engine, checkfirst=True)
        _add_row_columns(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_feedback_ts ON feedback (ts)"))


# The latest label per request: largest ts, ties: the larger label (Contract 2).
_BACKFILL_LABELS = (
    "UPDATE predictions SET "
    "label = (SELECT f.label FROM feedback f WHERE f.request_id = predictions.request_id "
    "ORDER BY f.ts DESC, f.label DESC LIMIT 1), "
    "label_ts = (SELECT MAX(f.ts) FROM feedback f WHERE f.request_id = predictions.request_id) "
    "WHERE EXISTS (SELECT 1 FROM feedback f WHERE f.request_id = predictions.request_id)"
)


def _add_row_columns(engine: Engine) -> None:
    """Add the missing row columns and backfill the labels, in one transaction that holds the table's write
    lock (two gateways starting together do it once; a crash leaves the columns absent, never unfilled)."""
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise ValueError(
            f"database dialect {dialect!r} is not supported for the prediction log: use SQLite or PostgreSQL"
        )
    if set(ROW_COLUMNS) <= _predictions_columns(engine):
        return  # every start after the first: no lock taken
    types = {c: logged_predictions.c[c].type.compile(dialect=engine.dialect) for c in ROW_COLUMNS}
    raw = engine.raw_connection()
    try:
        if dialect == "sqlite":
            con = raw.driver_connection
            saved, con.isolation_level = con.isolation_level, None  # explicit BEGIN: DDL inside the transaction
            try:
                cur = con.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    have = {r[1] for r in cur.execute("PRAGMA table_info(predictions)").fetchall()}
                    _alter_and_backfill(cur, have, types)
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
            finally:
                con.isolation_level = saved
        else:
            cur = raw.cursor()
            try:
                cur.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
                cur.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('predictions') "
                    "AND attnum > 0 AND NOT attisdropped"
                )
                have = {r[0] for r in cur.fetchall()}
                _alter_and_backfill(cur, have, types)
                raw.commit()
            except BaseException:
                raw.rollback()
                raise
    finally:
        raw.close()


def _predictions_columns(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.execute(text(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('predictions') "
                "AND attnum > 0 AND NOT attisdropped"
            )).fetchall()
        else:
            rows = [(r[1],) for r in conn.execute(text("PRAGMA table_info(predictions)")).fetchall()]
    return {r[0] for r in rows}


def _alter_and_backfill(cur, have: set[str], types: dict[str, str]) -> None:  # noqa: ANN001 - DB-API cursor
    missing = [c for c in ROW_COLUMNS if c not in have]
    for name in missing:
        cur.execute(f"ALTER TABLE predictions ADD COLUMN {name} {types[name]}")  # fixed names and types
    if "label" in missing or "label_ts" in missing:
        cur.execute(_BACKFILL_LABELS)
        log.info("prediction log: added columns %s and filled label/label_ts from feedback", missing)
    elif missing:
        log.info("prediction log: added columns %s", missing)


def _insert_ignoring_duplicates(engine: Engine, table: Table):  # noqa: ANN202 - dialect-specific Insert
    """INSERT that skips a row whose primary key exists (a repeated client request id must not fail a batch)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    return insert(table)


@dataclass
class PredictionLog:
    """Background batch writer of predictions and feedback with an in-memory index of recent request ids.

    The request path appends to a deque and never wakes the writer: the writer sleeps `flush_interval`, then
    takes everything queued in batches of `batch_size`. (A `queue.Queue` would wake the writer thread for every
    row, and each wake-up is a GIL hand-off the event loop pays for.)

    :param engine: SQLAlchemy engine of the log database.
    :param enabled: False disables writing predictions (benchmark baseline only; feedback then always 404s).
    :param batch_size: most rows per transaction.
    :param max_queue: queue bound; a full queue makes `put` wait (back-pressure), it never drops a row.
    :param flush_interval: how long the writer sleeps between batches, seconds.
    :param recent_ids: how many committed request ids to remember for feedback look-ups without a query.
    :param spill_path: where rows go if the database still refuses them when the gateway stops.
    :param on_written: called with the number of prediction rows committed (metrics).
    """

    engine: Engine
    enabled: bool = True
    batch_size: int = 500
    max_queue: int = 50_000
    flush_interval: float = 0.05
    recent_ids: int = 200_000
    spill_path: Path | None = None
    on_written: Callable[[int], None] | None = None
    _queue: deque = field(default_factory=deque, init=False)
    _room: threading.Condition = field(default_factory=threading.Condition, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _pending: dict[str, str] = field(default_factory=dict, init=False)
    _recent: OrderedDict = field(default_factory=OrderedDict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    rows_written: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._insert_prediction = _insert_ignoring_duplicates(self.engine, logged_predictions)
        self._insert_feedback = insert(feedback)
        self._update_label = text(_LABEL_UPDATE.format(label=":label", ts=":ts", rid=":request_id")).bindparams(
            bindparam("ts", type_=DateTime())
        )

    def start(self) -> None:
        """Start the writer thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Write every queued row, then stop the writer (called from the gateway's shutdown)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("prediction log writer did not finish within %.0fs; %d rows queued", timeout, self.backlog)
        self._thread = None

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet committed."""
        return len(self._queue)

    def known(self, request_id: str) -> str | None:
        """The model of a request id that is queued or recently committed, else None (then ask the database)."""
        with self._lock:
            return self._pending.get(request_id) or self._recent.get(request_id)

    def try_put_prediction(self, row: dict) -> bool:
        """Queue a prediction row without waiting; False when the queue is full (then call the blocking put)."""
        if not self.enabled:
            return True
        with self._lock:
            self._pending[row["request_id"]] = row["model"]
        if len(self._queue) >= self.max_queue:
            return False
        self._queue.append(("p", row))
        return True

    def _put_blocking(self, item: tuple[str, dict]) -> None:
        with self._room:
            while len(self._queue) >= self.max_queue:
                self._room.wait(0.05)
            self._queue.append(item)

    def put_prediction_blocking(self, row: dict) -> None:
        """Queue a prediction row, waiting while the queue is full (back-pressure)."""
        if self.enabled:
            self._put_blocking(("p", row))

    def put_feedback(self, row: dict) -> None:
        """Queue a feedback row, waiting while the queue is full."""
        self._put_blocking(("f", row))

    def lookup_model(self, request_id: str) -> str | None:
        """The model that answered `request_id`: memory first (queued or recent), then the database."""
        model = self.known(request_id)
        if model is not None:
            return model
        with self.engine.connect() as conn:
            return conn.execute(
                select(predictions.c.model).where(predictions.c.request_id == request_id)
            ).scalar_one_or_none()

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.flush_interval)
            while self._queue:
                batch = []
                while self._queue and len(batch) < self.batch_size:
                    batch.append(self._queue.popleft())
                with self._room:
                    self._room.notify_all()
                self._write(batch, final=stopping)
            if stopping:
                return

    def _write(self, batch: list[tuple[str, dict]], final: bool) -> None:
        preds = [row for kind, row in batch if kind == "p"]
        fbs = [row for kind, row in batch if kind == "f"]
        delay, attempts = 0.1, 0
        while True:
            try:
                self._insert(preds, fbs)
                break
            except Exception as exc:  # noqa: BLE001 - any database failure: keep the rows and retry
                attempts += 1
                log.error("prediction log write failed (attempt %d, %d rows): %s", attempts, len(batch), exc)
                if final and attempts >= 5:
                    self._spill(batch)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        with self._lock:
            for row in preds:
                rid = row["request_id"]
                self._recent[rid] = self._pending.pop(rid, row["model"])
            while len(self._recent) > self.recent_ids:
                self._recent.popitem(last=False)
        self.rows_written += len(preds)
        if self.on_written is not None and preds:
            self.on_written(len(preds))

    def _insert(self, preds: list[dict], fbs: list[dict]) -> None:
        """One transaction per batch: the units' first exposures, the prediction rows (with `unit_first`), the
        feedback rows, then the latest label of each request with feedback copied onto its prediction row
        (after the inserts, so a feedback for a prediction in the same batch finds its row).

        SQLite and psycopg2 get plain DB-API executemany/execute_values: the writer then holds the GIL for a
        fraction of the time SQLAlchemy's per-row processing takes, which keeps the request path's latency flat
        while a batch is written."""
        dialect, driver = self.engine.dialect.name, self.engine.dialect.driver
        exposures = _exposure_keys(preds)
        labels = _latest_labels(fbs)
        if dialect not in ("sqlite", "postgresql") or (dialect == "postgresql" and driver != "psycopg2"):
            with self.engine.begin() as conn:
                new = self._new_exposures_sqlalchemy(conn, list(exposures)) if exposures else set()
                flags = _unit_flags(preds, exposures, new)
                if preds:
                    conn.execute(
                        self._insert_prediction,
                        [
                            {**{c: row.get(c) for c in _BASE_COLUMNS}, "unit_first": flag}
                            for row, flag in zip(preds, flags, strict=True)
                        ],
                    )
                if fbs:
                    conn.execute(self._insert_feedback, fbs)
                if labels:
                    conn.execute(self._update_label, labels)
            return
        as_text = dialect == "sqlite"
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            keys = list(exposures)
            if dialect == "sqlite":
                new = set()
                for start in range(0, len(keys), _SQLITE_EXPOSURES_PER_STATEMENT):
                    chunk = keys[start : start + _SQLITE_EXPOSURES_PER_STATEMENT]
                    sql = _SQLITE_EXPOSURES.format(values=", ".join(["(?, ?, ?, ?)"] * len(chunk)))
                    new.update(tuple(r) for r in cur.execute(sql, [v for key in chunk for v in key]).fetchall())
            else:
                from psycopg2.extras import execute_batch, execute_values

                new = (
                    {tuple(r) for r in execute_values(cur, _PG_EXPOSURES, keys, page_size=1000, fetch=True)}
                    if keys
                    else set()
                )
            flags = _unit_flags(preds, exposures, new)
            pred_rows = [_values(row, PREDICTION_COLUMNS, as_text, flag) for row, flag in zip(preds, flags, strict=True)]
            fb_rows = [_values(row, FEEDBACK_COLUMNS, as_text) for row in fbs]
            if as_text:
                for entry in labels:
                    entry["ts"] = _ts_text(entry["ts"])
            if dialect == "sqlite":
                if pred_rows:
                    cur.executemany(_SQLITE_PREDICTIONS, pred_rows)
                if fb_rows:
                    cur.executemany(_SQLITE_FEEDBACK, fb_rows)
                if labels:
                    cur.executemany(_SQLITE_LABEL, labels)
            else:
                if pred_rows:
                    execute_values(cur, _PG_PREDICTIONS, pred_rows, page_size=1000)
                if fb_rows:
                    execute_values(cur, _PG_FEEDBACK, fb_rows, page_size=1000)
                if labels:
                    execute_batch(cur, _PG_LABEL, labels, page_size=500)
            cur.close()
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()

    def _new_exposures_sqlalchemy(self, conn, keys: list[tuple]) -> set[tuple]:  # noqa: ANN001 - Connection
        """The keys not yet in `unit_exposures`, inserted (other PostgreSQL drivers than psycopg2)."""
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = (
            pg_insert(unit_exposures)
            .on_conflict_do_nothing(index_elements=["model", "generation", "arm", "unit_id"])
            .returning(unit_exposures.c.model, unit_exposures.c.generation, unit_exposures.c.arm,
                       unit_exposures.c.unit_id)
        )
        params = [dict(zip(("model", "generation", "arm", "unit_id"), key, strict=True)) for key in keys]
        if getattr(conn.dialect, "insert_executemany_returning", False):
            return {tuple(r) for r in conn.execute(stmt, params).fetchall()}
        return {tuple(r) for p in params for r in conn.execute(stmt, p).fetchall()}

    def _spill(self, batch: list[tuple[str, dict]]) -> None:
        path = self.spill_path or Path("gateway-unwritten-rows.jsonl")
        with open(path, "a") as handle:
            for kind, row in batch:
                handle.write(
                    json.dumps({"table": "predictions" if kind == "p" else "feedback", **row}, default=str)
                )
                handle.write("\n")
        log.error("database unavailable at shutdown: %d rows written to %s for replay", len(batch), path)


_BASE_COLUMNS = tuple(c.name for c in predictions.columns)
PREDICTION_COLUMNS = (*_BASE_COLUMNS, "unit_first")  # label/label_ts start NULL: feedback fills them
FEEDBACK_COLUMNS = tuple(c.name for c in feedback.columns)
_SQLITE_PREDICTIONS = (
    f"INSERT OR IGNORE INTO predictions ({', '.join(PREDICTION_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(PREDICTION_COLUMNS))})"
)
_SQLITE_FEEDBACK = (
    f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) VALUES ({', '.join('?' * len(FEEDBACK_COLUMNS))})"
)
_PG_PREDICTIONS = (
    f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) VALUES %s ON CONFLICT (request_id) DO NOTHING"
)
_PG_FEEDBACK = f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) VALUES %s"

# A unit's first request per (model, route generation, arm): the insert that succeeds returns the key.
_EXPOSURE_KEY = "model, generation, arm, unit_id"
_SQLITE_EXPOSURES = (
    f"INSERT INTO unit_exposures ({_EXPOSURE_KEY}) VALUES {{values}} ON CONFLICT DO NOTHING RETURNING {_EXPOSURE_KEY}"
)
_SQLITE_EXPOSURES_PER_STATEMENT = 2000  # 4 variables each, below SQLite's 32766 limit
_PG_EXPOSURES = f"INSERT INTO unit_exposures ({_EXPOSURE_KEY}) VALUES %s ON CONFLICT DO NOTHING RETURNING {_EXPOSURE_KEY}"

# The feedback's label goes onto the prediction row when it is the latest: larger ts, ties: the larger label.
_LABEL_UPDATE = (
    "UPDATE predictions SET label = {label}, label_ts = {ts} WHERE request_id = {rid} "
    "AND (label_ts IS NULL OR label_ts < {ts} OR (label_ts = {ts} AND label < {label}))"
)
_SQLITE_LABEL = _LABEL_UPDATE.format(label=":label", ts=":ts", rid=":request_id")
_PG_LABEL = _LABEL_UPDATE.format(label="%(label)s", ts="%(ts)s", rid="%(request_id)s")


def _ts_text(ts: datetime) -> str:
    """A timestamp as SQLite stores it (the text SQLAlchemy's DateTime writes and reads back)."""
    return ts.isoformat(sep=" ", timespec="microseconds")


def _values(row: dict, columns: tuple[str, ...], ts_as_text: bool, unit_first: int | None = None) -> tuple:
    """A row as a tuple in column order (`unit_first` from the argument); SQLite timestamps as text."""
    values = [row.get(c) for c in columns]
    if columns[-1] == "unit_first":
        values[-1] = unit_first
    if ts_as_text:
        values[1] = _ts_text(values[1])
    return tuple(values)


def _exposure_keys(preds: list[dict]) -> dict[tuple, int]:
    """(model, generation, arm, unit_id) of the batch's rows with a unit id -> index of its first row."""
    keys: dict[tuple, int] = {}
    for i, row in enumerate(preds):
        unit, generation = row.get("unit_id"), row.get("generation")
        if unit is not None and generation is not None:
            keys.setdefault((row["model"], int(generation), row["arm"], unit), i)
    return keys


def _unit_flags(preds: list[dict], keys: dict[tuple, int], new: set[tuple]) -> list[int | None]:
    """`unit_first` per row: 1 on the first row of a key seen for the first time, 0 on other rows with a unit
    id, None without a unit id (or, for rows queued by other code, without the route generation)."""
    flags: list[int | None] = [
        None if row.get("unit_id") is None or row.get("generation") is None else 0 for row in preds
    ]
    for key, i in keys.items():
        if key in new:
            flags[i] = 1
    return flags


def _latest_labels(fbs: list[dict]) -> list[dict]:
    """Per request of the batch's feedback the latest label (largest ts, ties: the larger label)."""
    latest: dict[str, dict] = {}
    for row in fbs:
        have = latest.get(row["request_id"])
        if have is None or (row["ts"], row["label"]) > (have["ts"], have["label"]):
            latest[row["request_id"]] = {"request_id": row["request_id"], "label": row["label"], "ts": row["ts"]}
    return list(latest.values())


@dataclass
class RouteStore:
    """Persistence of routes with compare-and-set on the generation."""

    engine: Engine

    def load_all(self) -> dict[str, Route]:
        """Every stored route by model."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(routes)).mappings().all()
        return {row["model"]: Route(**dict(row)) for row in rows}

    def insert(self, route: Route) -> bool:
        """Store a first route; False when one already exists (another process created it)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(routes).values(**_route_row(route)))
            return True
        except DBAPIError:
            return False

    def replace(self, route: Route, expected_generation: int) -> bool:
        """Write `route` only when the stored generation is still `expected_generation`."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(routes)
                .where(routes.c.model == route.model, routes.c.generation == expected_generation)
                .values(**_route_row(route))
            )
            return result.rowcount == 1


def _route_row(route: Route) -> dict:
    return {
        "model": route.model,
        "stable": route.stable,
        "canary": route.canary,
        "canary_percent": route.canary_percent,
        "mode": route.mode,
        "generation": route.generation,
        "lease_expires_at": route.lease_expires_at,
        "salt": route.salt,
        "updated_at": route.updated_at,
    }


def prediction_row(
    *,
    request_id: str,
    ts: datetime,
    model: str,
    version: str,
    arm: str,
    unit_id: str | None,
    features: dict,
    prediction: float | None,
    score: float | None,
    latency_ms: float,
    status: str,
    error: str | None,
    generation: int | None = None,
) -> dict:
    """One `predictions` row; NaN scores and predictions are stored as NULL.

    `generation` is the route generation the request was routed under: the writer flags the first request of
    each (model, generation, arm, unit) with `unit_first = 1` (it is not a column of the log).
    """
    return {
        "request_id": request_id,
        "ts": ts,
        "model": model,
        "version": version,
        "arm": arm,
        "unit_id": unit_id,
        "features": json.dumps(features, separators=(",", ":")),
        "prediction": _number_or_none(prediction),
        "score": _number_or_none(score),
        "latency_ms": latency_ms,
        "status": status,
        "error": error,
        "generation": generation,
    }


def _number_or_none(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if number != number or number in (float("inf"), float("-inf")) else number
