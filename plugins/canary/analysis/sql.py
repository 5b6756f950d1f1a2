"""Aggregations inside the database for one look, the pre-rollout baseline and the hold sensor.

Every function takes a SQLAlchemy ``Connection`` or ``Engine`` (the Airflow ``PredictionLogHook`` gives an
engine via ``get_sqlalchemy_engine()``) and reads the Contract 2 tables ``predictions`` and ``feedback``.
SQL is parameterized (values are bound, never formatted in); identifiers are fixed. The same queries run on
SQLite and PostgreSQL and give the same numbers (a continuous metric's sums to floating-point rounding:
PostgreSQL's look reads them as ``avg`` and ``var_pop``); the cluster expression and the cheapest form of
an aggregate differ by dialect.

``windows`` are ``[(step_index, percent, start_ts, end_ts), ...]`` from the recorded ``step_started_at``
and ``look_at`` (naive UTC datetimes): a row belongs to a step when ``start <= ts < end``.

Rows are never all loaded: :func:`look_stats` returns one row per (arm, step, time cluster) with counts,
sums and sums of squares per metric (clusters are ``policy.cluster_seconds`` wide, aligned to the epoch:
cluster id = epoch seconds // width, so width 60 gives the epoch minutes); :func:`sample_rows` returns at
most ``limit`` rows (a reproducible sample drawn by the database) for data quality and drift.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import DateTime, bindparam, text

from canary.analysis.policy import MetricPolicy, Policy
from canary.analysis.stats import ArmStats, MetricCells

Window = tuple[int, float, datetime, datetime]


@contextmanager
def _connect(bind: Any, snapshot: bool = False):
    """Yield a Connection from an Engine or pass a Connection through (never closing the caller's).

    ``snapshot``: a connection of our own reads in one snapshot, so the look's statements (the scan, per
    cell on SQLite, and the late-label correction) see the same rows; otherwise a label arriving between
    them would be counted twice or not at all. PostgreSQL: REPEATABLE READ. SQLite: one read transaction,
    only when the database is in WAL mode (the gateway's), where a reader does not hold writers back; in
    rollback-journal mode it would block the gateway's commits for the whole look, so each statement
    reads the latest commit there.
    """
    if hasattr(bind, "connect") and not hasattr(bind, "execute"):
        with bind.connect() as conn:
            if snapshot and conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            elif snapshot and conn.dialect.name == "sqlite" and \
                    str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() == "wal" and \
                    not conn.connection.dbapi_connection.in_transaction:  # (an engine that begins its own)
                conn.exec_driver_sql("BEGIN")  # the rollback when the connection closes ends it
            yield conn
    else:
        yield bind


def _bucket(dialect: str, width: int = 60, col: str = "p.ts") -> str:
    """SQL of the time cluster of ``col`` (see :func:`_bucket_int` for the integer id it becomes).

    Width 60 keeps the cheap per-row expressions: ``date_trunc('minute', ts)`` (PostgreSQL) or the ISO text
    up to the minute (SQLite), turned into epoch minutes in Python. Other widths compute ``epoch seconds //
    width`` in the database, with the width bound as ``:cw``: PostgreSQL ``floor(extract(epoch from ts) /
    :cw)`` (``extract`` is exact numeric since PostgreSQL 14); SQLite ``strftime('%s', ...)`` on the text cut
    to whole seconds, because on the full text it rounds to milliseconds first (``...:09.999999`` would
    become second 10 and land in the next cluster, unlike the cell ranges on the text).
    """
    if dialect == "postgresql":
        return f"date_trunc('minute', {col})" if width == 60 else \
            f"CAST(floor(extract(epoch from {col}) / :cw) AS bigint)"
    if dialect == "sqlite":
        return f"substr({col}, 1, 16)" if width == 60 else \
            f"(CAST(strftime('%s', substr({col}, 1, 19)) AS INTEGER) / :cw)"
    raise ValueError(f"database dialect {dialect!r} is not supported: use SQLite or PostgreSQL")


def _bucket_int(v: Any, width: int = 60) -> int:
    """The cluster id ``epoch seconds // width`` of a :func:`_bucket` value or a datetime (for width 60 the
    epoch minute, the ids the look always had)."""
    if isinstance(v, int | float | Decimal):
        return int(v)
    if isinstance(v, datetime):
        return (v.replace(tzinfo=None) - _EPOCH) // timedelta(seconds=width)
    return (datetime.fromisoformat(str(v)) - _EPOCH) // timedelta(seconds=width)


_EPOCH = datetime(1970, 1, 1)


def _nan_check(dialect: str, col: str) -> str:
    return f"({col} IS NULL OR {col} = 'NaN'::float8)" if dialect == "postgresql" else f"({col} IS NULL)"


def _value_sql(m: MetricPolicy, i: int, dialect: str, params: dict[str, Any], thresholds: dict[str, float]) -> str:
    """SQL expression of the per-request value of metric ``m`` (NULL when not observable)."""
    s = m.source
    if m.kind == "latency_threshold":
        thr = m.threshold if isinstance(m.threshold, int | float) else thresholds.get(m.name)
        if thr is None:
            raise ValueError(f"metric {m.name!r} has threshold 'baseline_p95' but no baseline was given: pass "
                             "thresholds={name: ms} (from canary.analysis.sql.baseline) to look_stats")
        params[f"thr{i}"] = float(thr)
        return f"CASE WHEN p.latency_ms > :thr{i} THEN 1.0 ELSE 0.0 END"
    if s == "error":
        return "CASE WHEN p.status = 'error' THEN 1.0 ELSE 0.0 END"
    if s == "latency_ms":
        return "p.latency_ms"
    if s == "score":
        return "p.score"
    if s == "prediction":
        return "p.prediction"
    if s == "null_score":
        return f"CASE WHEN p.status = 'ok' AND {_nan_check(dialect, 'p.score')} THEN 1.0 WHEN p.status = 'ok' THEN 0.0 END"
    label = {
        "label": "f.label",
        "mismatch": "CASE WHEN p.prediction <> f.label THEN 1.0 ELSE 0.0 END",
        "abs_error": "ABS(p.prediction - f.label)",
        "squared_error": "(p.prediction - f.label) * (p.prediction - f.label)",
    }[s]
    need_pred = "" if s == "label" else " AND p.prediction IS NOT NULL"
    return (f"CASE WHEN p.ts < :elig{i} AND f.label IS NOT NULL AND p.status = 'ok'{need_pred} "
            f"THEN {label} END")


def _windows_sql(windows: list[Window], params: dict[str, Any]) -> tuple[str, str, list[str]]:
    """The step CASE and one index-friendly range over all windows (rows in gaps get step NULL)."""
    cases, names = [], []
    for j, (step, _pct, start, end) in enumerate(windows):
        params[f"ws{j}"], params[f"we{j}"] = start, end
        names += [f"ws{j}", f"we{j}"]
        cases.append(f"WHEN p.ts >= :ws{j} AND p.ts < :we{j} THEN {int(step)}")
    params["wlo"], params["whi"] = min(w[2] for w in windows), max(w[3] for w in windows)
    names += ["wlo", "whi"]
    return "CASE " + " ".join(cases) + " END", "(p.ts >= :wlo AND p.ts < :whi)", names


def _check_windows(windows: list[Window]) -> list[Window]:
    out = []
    for w in windows:
        if len(w) != 4:
            raise ValueError(f"window {w!r} must be (step_index, percent, start_ts, end_ts)")
        step, pct, start, end = w
        if not isinstance(start, datetime) or not isinstance(end, datetime) or end < start:
            raise ValueError(f"window {w!r}: start and end must be naive UTC datetimes with start <= end")
        out.append((int(step), float(pct), start.replace(tzinfo=None), end.replace(tzinfo=None)))
    if not out:
        raise ValueError("windows is empty: pass one (step_index, percent, start, end) per step so far")
    return out


def _statement(sql: str, datetimes: list[str]) -> tuple[Any, set[str]]:
    """The ``text()`` statement (``datetimes`` bound as DateTime) and the parameter names it uses."""
    used = set(re.findall(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)", sql))
    return text(sql).bindparams(*[bindparam(n, type_=DateTime()) for n in datetimes if n in used]), used


def _run(conn: Any, sql: str, params: dict[str, Any], datetimes: list[str]):
    stmt, used = _statement(sql, datetimes)
    return conn.execute(stmt, {k: v for k, v in params.items() if k in used}).fetchall()


LABEL_COLUMNS = ("label", "label_ts")
UNIT_COLUMN = "unit_first"


def log_columns(bind: Any) -> set[str]:
    """Column names of the ``predictions`` table (to see whether the gateway keeps the latest label and the
    units' first requests on the row, Contract 2)."""
    with _connect(bind) as conn:
        if conn.dialect.name == "postgresql":  # one catalog query (the SQLAlchemy inspector runs several)
            return {r[0] for r in conn.execute(text(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('predictions') AND attnum > 0 "
                "AND NOT attisdropped")).fetchall()}
        return {r[1] for r in conn.execute(text("PRAGMA table_info(predictions)")).fetchall()}


def _bool(dialect: str, expr: str) -> str:
    """A boolean as 0/1 (NULL stays NULL): SQLite's comparisons already are integers."""
    return f"CAST(({expr}) AS INTEGER)" if dialect == "postgresql" else f"({expr})"


def _binary(m: MetricPolicy) -> bool:
    """True when the per-request value is 0/1, so the sum of squares equals the sum."""
    return m.kind == "latency_threshold" or m.source in ("error", "null_score", "mismatch")


def _label_value(m: MetricPolicy, dialect: str, lab: str) -> str:
    """The per-request value of label metric ``m`` given the label expression ``lab``."""
    return {
        "label": lab,
        "mismatch": _bool(dialect, f"p.prediction <> {lab}"),
        "abs_error": f"ABS(p.prediction - {lab})",
        "squared_error": f"(p.prediction - {lab}) * (p.prediction - {lab})",
    }[m.source]


def _eligible_sql(m: MetricPolicy, i: int, by_time: bool = True) -> str:
    """Predictions that count for label metric ``m``: old enough for their label (unless ``by_time`` is
    False: the caller knows the whole range is), answered."""
    need_pred = "" if m.source == "label" else " AND p.prediction IS NOT NULL"
    return (f"p.ts < :elig{i} AND " if by_time else "") + f"p.status = 'ok'{need_pred}"


def _flag_sql(m: MetricPolicy, i: int, dialect: str, params: dict[str, Any], thresholds: dict[str, float]
              ) -> str | None:
    """The condition of a metric observed on every request as a 0/1 flag (an error, a latency above the
    threshold, which is bound here), or None for any other metric."""
    if m.kind != "latency_threshold" and m.source != "error":
        return None
    _value_sql(m, i, dialect, params, thresholds)  # binds the threshold
    return f"p.latency_ms > :thr{i}" if m.kind == "latency_threshold" else "p.status = 'error'"


def _row_value_sql(m: MetricPolicy, i: int, dialect: str, params: dict[str, Any],
                   thresholds: dict[str, float]) -> str:
    """SQL of the per-request value of a metric that needs no label, as the one-scan look aggregates it
    (NULL when the request is not observable). Label metrics are aggregated by :func:`_label_aggs`."""
    cond = _flag_sql(m, i, dialect, params, thresholds)
    if cond is not None:
        return _bool(dialect, cond)
    if m.source == "null_score":
        return f"CASE WHEN p.status = 'ok' THEN {_bool(dialect, _nan_check(dialect, 'p.score'))} END"
    return _value_sql(m, i, dialect, params, thresholds)


#: Base of the packed label counters (:func:`_label_aggs`): eligible + B * labelled + B^2 * mismatches in
#: one SUM is exact while a (cell, arm) holds fewer than B requests (the total stays below 2^63).
PACK_BASE = 1 << 21


def _label_aggs(m: MetricPolicy, i: int, dialect: str, pack: int | None) -> list[str]:
    """Aggregates of label metric ``m`` over the rows of one cell, reading the label kept on the row:
    eligible predictions, labelled ones, the sum and the sum of squares of the value.

    The eligibility condition is the costly part of a row, so it is evaluated once: with ``pack`` the
    counts are digits of one integer (``1 + pack * labelled [+ pack^2 * mismatch]`` summed over eligible
    rows; a mismatch is 0/1, so its sum of squares is its sum), decoded by :func:`_read_label`. The digits
    come from a CASE of constants (no per-row arithmetic, about 10 % of the scan's time less on PostgreSQL
    than multiplying flags). ``pack`` None gives one aggregate per number. The label's arrival time is not
    tested per row either: rows whose label arrived after the look are corrected afterwards
    (:func:`_add_late_labels`).
    """
    elig = _eligible_sql(m, i, by_time=False)
    value = _label_value(m, dialect, "p.label")
    if pack is None:
        aggs = [f"SUM({_bool(dialect, elig)})", f"COUNT(CASE WHEN {elig} THEN {value} END)",
                f"SUM(CASE WHEN {elig} THEN {value} END)"]
        return aggs + ([] if _binary(m) else [f"SUM(CASE WHEN {elig} THEN ({value}) * ({value}) END)"])
    if m.source == "mismatch":
        return [f"SUM(CASE WHEN {elig} THEN CASE WHEN p.label IS NULL THEN 1 WHEN p.prediction <> p.label "
                f"THEN {1 + pack + pack * pack} ELSE {1 + pack} END END)"]
    return [f"SUM(CASE WHEN {elig} THEN CASE WHEN p.label IS NULL THEN 1 ELSE {1 + pack} END END)",
            f"SUM(CASE WHEN {elig} THEN {value} END)", f"SUM(CASE WHEN {elig} THEN ({value}) * ({value}) END)"]


def _value_aggs(m: MetricPolicy, i: int, dialect: str, params: dict[str, Any], thresholds: dict[str, float]
                ) -> tuple[list[str], str]:
    """Aggregates of a metric that needs no label over the rows of one cell, and how :func:`_read_value`
    reads them: ``always`` (observed on every request: its count is the cell's requests), ``value`` (count,
    sum, sum of squares) or ``moments`` (PostgreSQL: count, ``avg`` and ``var_pop``, which share one
    transition per row, so a continuous metric costs two aggregate steps instead of three). On PostgreSQL a
    0/1 metric is a ``COUNT(*) FILTER``, the cheapest aggregate."""
    cond = _flag_sql(m, i, dialect, params, thresholds)
    always = cond is not None
    if dialect == "postgresql" and always:
        return [f"COUNT(*) FILTER (WHERE {cond})"], "always"
    v = _row_value_sql(m, i, dialect, params, thresholds)
    if dialect == "postgresql":
        if m.source == "null_score":
            return ["COUNT(*) FILTER (WHERE p.status = 'ok')",
                    f"COUNT(*) FILTER (WHERE p.status = 'ok' AND {_nan_check(dialect, 'p.score')})"], "value"
        return [f"COUNT({v})", f"avg({v})", f"var_pop({v})"], "moments"
    aggs = ([] if always else [f"COUNT({v})"]) + [f"SUM({v})"]
    return aggs + ([] if _binary(m) else [f"SUM(({v}) * ({v}))"]), "always" if always else "value"


def _read_value(m: MetricPolicy, how: str, r: tuple, k: int, requests: int) -> tuple[list, int]:
    """``[n, s1, s2]`` of a metric from the aggregates of :func:`_value_aggs` at ``r[k:]``, and the index
    after them."""
    if how == "moments":
        n, mean, var = r[k], r[k + 1], r[k + 2]
        if not n:
            return [0, None, None], k + 3
        mean, var = float(mean), float(var)
        return [n, n * mean, n * (var + mean * mean)], k + 3
    n = requests if how == "always" else r[k]
    k += 0 if how == "always" else 1
    s1 = r[k]
    s2 = s1 if _binary(m) else r[k + 1]
    return [n, s1, s2], k + (1 if _binary(m) else 2)


def _read_label(m: MetricPolicy, r: tuple, k: int, pack: int | None) -> tuple[list, int]:
    """``[n, s1, s2, eligible]`` of label metric ``m`` from the aggregates of :func:`_label_aggs` at
    ``r[k:]``, and the index after them."""
    if pack is None:
        e, n, s1 = r[k], r[k + 1], r[k + 2]
        s2 = s1 if _binary(m) else r[k + 3]
        return [n, s1, s2, e], k + (3 if _binary(m) else 4)
    code = int(r[k] or 0)
    e, n = code % pack, code // pack % pack
    if m.source == "mismatch":
        s1 = code // (pack * pack)
        return [n, s1, s1, e], k + 1
    return [n, r[k + 1], r[k + 2], e], k + 3


def _cell_grid(windows: list[Window], cuts: tuple[datetime, ...] = (), width: int = 60
               ) -> tuple[list[datetime], list[tuple[int, int] | None]]:
    """Time points cutting the windows at every cluster boundary (every multiple of ``width`` seconds since
    the epoch), window edge and time in ``cuts``, and for each interval ``[points[j], points[j + 1])`` its
    ``(step, cluster id)`` or None (between windows). A time in several windows belongs to the first (as
    the step CASE does)."""
    size = timedelta(seconds=width)
    points = {c for c in cuts if any(w[2] < c < w[3] for w in windows)}
    for _step, _pct, start, end in windows:
        points.update((start, end))
        t = _EPOCH + ((start - _EPOCH) // size + 1) * size
        while t < end:
            points.add(t)
            t += size
    pts = sorted(points)
    cells: list[tuple[int, int] | None] = []
    for lo, hi in zip(pts, pts[1:], strict=False):
        step = next((w[0] for w in windows if w[2] <= lo and hi <= w[3]), None)
        cells.append(None if step is None else (step, _bucket_int(lo, width)))
    return pts, cells


def _cells(windows: list[Window], cuts: tuple[datetime, ...] = (), width: int = 60
           ) -> list[tuple[int, int, datetime, datetime]]:
    """``(step, cluster, lo, hi)`` of every interval of :func:`_cell_grid` inside a window."""
    pts, cells = _cell_grid(windows, cuts, width)
    return [(c[0], c[1], pts[j], pts[j + 1]) for j, c in enumerate(cells) if c is not None]


def _rows_denormalized(conn: Any, dialect: str, model: str, windows: list[Window], policy: Policy,
                       look_at: datetime, thresholds: dict[str, float], with_units: bool,
                       pack: int | None = PACK_BASE) -> tuple[list[tuple], dict[tuple[str, int], int] | None]:
    """One scan: rows (arm, step, cluster, requests, per metric n/s1/s2 [+ eligible]) and, when the
    ``unit_first`` flag is set on every row with a unit id, distinct units per (arm, step).

    The windows are cut into cells at every cluster boundary (``policy.cluster_seconds``), window edge and
    label eligibility time (``look_at - label_delay``), so a cell is wholly old enough for a label metric or
    wholly not; label counts of cells that are not are set to zero here, and no per-row time test is needed.
    The cluster of a cell is known from its bounds, so no per-row time expression is computed either.
    ``pack``: the base of the packed label counters (:func:`_label_aggs`); a (cell, arm) with as many
    requests is read again unpacked (at 60 s clusters that is 35,000 requests a second to one arm).
    """
    params: dict[str, Any] = {"model": model, "look_at": look_at}
    dts = ["look_at"]
    label_idx = [i for i, m in enumerate(policy.metrics) if m.needs_labels]
    elig_at = {i: look_at - timedelta(seconds=policy.metrics[i].label_delay_s) for i in label_idx}
    for i in label_idx:
        params[f"elig{i}"] = elig_at[i]
        dts.append(f"elig{i}")
    aggs, shape = ["COUNT(*)"], []
    for i, m in enumerate(policy.metrics):
        if m.needs_labels:
            aggs += _label_aggs(m, i, dialect, pack)
            shape.append((i, m, "label"))
            continue
        more, how = _value_aggs(m, i, dialect, params, thresholds)
        aggs += more
        shape.append((i, m, how))
    if with_units:
        aggs += ([f"COUNT(p.unit_id) FILTER (WHERE p.{UNIT_COLUMN} IS NULL)"] if dialect == "postgresql" else
                 [f"COUNT(CASE WHEN p.{UNIT_COLUMN} IS NULL THEN p.unit_id END)"]) + [f"SUM(p.{UNIT_COLUMN})"]
    width = policy.cluster_seconds
    pts, cells = _cell_grid(windows, tuple(elig_at.values()), width)
    raw: list[tuple] = []  # (arm, step, cluster, lo, aggregates...)
    if dialect == "postgresql":
        # One parallel aggregate by (arm, cluster, piece): the cluster is date_bin's integer arithmetic on
        # the timestamp (PostgreSQL 14+; before, every cut is a piece), the piece a binary search over the
        # few cut points that are not cluster boundaries (window edges, label eligibility times). A binary
        # search over all cut points cost about 10 % more of the scan.
        binned = conn.dialect.server_version_info >= (14,)
        size = timedelta(seconds=width)
        pieces = [t for t in pts if not binned or (t - _EPOCH) % size] or [pts[0]]
        params.update(cuts=pieces, cw=width, wlo=pts[0], whi=pts[-1])
        cluster = "date_bin(make_interval(secs => :cw), p.ts, TIMESTAMP '1970-01-01')" if binned else \
            "CAST(:wlo AS timestamp)"
        sql = (f"SELECT p.arm, {cluster}, width_bucket(p.ts, CAST(:cuts AS timestamp[])), {', '.join(aggs)} "
               "FROM predictions p WHERE p.model = :model AND p.ts >= :wlo AND p.ts < :whi GROUP BY 1, 2, 3")
        index = {t: j for j, t in enumerate(pts)}
        for r in _run(conn, sql, params, [*dts, "wlo", "whi"]):
            # the rows' interval starts at the later of the cluster's start and the piece's cut point
            lo = r[1] if r[2] == 0 else max(r[1], pieces[r[2] - 1])
            j = index.get(lo)
            if r[0] in ("stable", "canary") and j is not None and j < len(cells) and cells[j] is not None:
                raw.append((r[0], *cells[j], pts[j], *r[3:]))
    else:  # SQLite: per cell and arm one range of the (model, ts) index, aggregated without a sorter
        sql = " UNION ALL ".join(
            f"SELECT '{arm}', {', '.join(aggs)} FROM predictions p WHERE p.model = :model AND p.arm = '{arm}' "
            "AND p.ts >= :lo AND p.ts < :hi" for arm in ("stable", "canary"))
        stmt, used = _statement(sql, [*dts, "lo", "hi"])
        for j, cell in enumerate(cells):
            if cell is None:
                continue
            params["lo"], params["hi"] = pts[j], pts[j + 1]
            raw += [(r[0], *cell, pts[j], *r[1:])
                    for r in conn.execute(stmt, {k: params[k] for k in used}).fetchall() if r[1]]
    if pack is not None and label_idx and any(r[4] >= pack for r in raw):
        return _rows_denormalized(conn, dialect, model, windows, policy, look_at, thresholds, with_units, None)
    rows, unit_parts = [], []
    for r in raw:
        out, k = [r[0], r[1], r[2], r[4]], 5
        for i, m, how in shape:
            if how == "label":
                vals, k = _read_label(m, r, k, pack)
                if r[3] >= elig_at[i]:  # the cell is younger than the label delay
                    vals = [0, 0, 0, 0]
                out += vals
                continue
            vals, k = _read_value(m, how, r, k, r[4])
            out += vals
        rows.append(out)
        if with_units:
            unit_parts.append((r[0], int(r[1]), r[k] or 0, r[k + 1] or 0))
    rows = _merge(rows)
    if label_idx:
        rows = _add_late_labels(conn, dialect, model, windows, policy, params, dts, rows)
    rows = [tuple(r) for r in rows]
    if not with_units:
        return rows, None
    if any(p[2] for p in unit_parts):
        return rows, None  # rows with a unit id but no flag (logged before the gateway kept it): count distinct
    units: dict[tuple[str, int], int] = {}
    for arm, step, _unflagged, first in unit_parts:
        units[(arm, step)] = units.get((arm, step), 0) + int(first)
    return rows, units


def _merge(rows: list[list]) -> list[list]:
    """Sum rows of the same (arm, step, cluster) (a cluster cut at a label eligibility time)."""
    out: dict[tuple[Any, Any, Any], list] = {}
    for r in rows:
        key = (r[0], r[1], r[2])
        if key in out:
            tgt = out[key]
            for c in range(3, len(r)):
                tgt[c] = (tgt[c] or 0) + (r[c] or 0)
        else:
            out[key] = list(r)
    return list(out.values())


def _add_late_labels(conn: Any, dialect: str, model: str, windows: list[Window], policy: Policy,
                     params: dict[str, Any], dts: list[str], rows: list[list]) -> list[list]:
    """Correct the label metrics of rows whose kept label arrived after the look time: the scan counted
    their current label; the look must use the latest one received by the look time (from the ``feedback``
    history; none when the first label came later), so this adds ``value(label at the look) -
    value(current label)`` per cell. Only requests with feedback after the look are read: the
    ``feedback(ts)`` index finds them (a probe when there are none), the primary key their predictions,
    and one ``feedback(request_id)`` look-up each their label at the look (a scalar subquery, evaluated once
    per row behind the ``OFFSET`` fence; a join of the late requests' whole feedback history made the
    planners scan it)."""
    params = dict(params)
    width = params["cw"] = policy.cluster_seconds
    step_case, where_win, wnames = _windows_sql(windows, params)
    aggs, pos = [], []
    col = 4
    for i, m in enumerate(policy.metrics):
        if m.needs_labels:
            for lab in ("p.lab", "p.label"):
                v = f"CASE WHEN {_eligible_sql(m, i)} THEN {_label_value(m, dialect, lab)} END"
                aggs += [f"COUNT({v})", f"SUM({v})", f"SUM(({v}) * ({v}))"]
            pos.append(col)
        col += 4 if m.needs_labels else 3
    fence = "OFFSET 0" if dialect == "postgresql" else "LIMIT -1 OFFSET 0"
    # rows younger than every label delay count for no label metric: their labels are not looked up
    params["eligmax"] = max(params[f"elig{i}"] for i, m in enumerate(policy.metrics) if m.needs_labels)
    sql = (f"SELECT p.arm, {step_case} AS step, {_bucket(dialect, width)} AS cluster, {', '.join(aggs)} FROM ("
           "SELECT p.arm, p.ts, p.status, p.prediction, p.label, (SELECT f.label FROM feedback f WHERE "
           "f.request_id = p.request_id AND f.ts <= :look_at ORDER BY f.ts DESC, f.label DESC LIMIT 1) AS lab "
           "FROM predictions p WHERE p.request_id IN (SELECT f.request_id FROM feedback f WHERE f.ts > :look_at) "
           "AND p.label_ts > :look_at AND p.ts < :eligmax AND p.model = :model AND p.arm IN ('stable', 'canary') "
           f"AND {where_win} {fence}) p GROUP BY 1, 2, 3")
    index = {(r[0], int(r[1]), int(r[2])): r for r in rows}
    for r in _run(conn, sql, params, [*dts, *wnames, "eligmax"]):
        if r[1] is None:
            continue
        target = index[(r[0], int(r[1]), _bucket_int(r[2], width))]
        for j, c in enumerate(pos):
            at_look, current = r[3 + 6 * j: 6 + 6 * j], r[6 + 6 * j: 9 + 6 * j]
            for d in range(3):
                target[c + d] = (target[c + d] or 0) + (at_look[d] or 0) - (current[d] or 0)
    return rows


def _distinct_units(conn: Any, model: str, windows: list[Window]) -> dict[tuple[str, int], int]:
    """Distinct unit ids per (arm, step): a second scan, for logs without the ``unit_first`` flag."""
    params: dict[str, Any] = {"model": model}
    step_case, where_win, wnames = _windows_sql(windows, params)
    usql = (f"SELECT arm, step, COUNT(unit_id) FROM (SELECT DISTINCT p.arm AS arm, {step_case} AS step, "
            f"p.unit_id AS unit_id FROM predictions p WHERE p.model = :model AND p.arm IN ('stable', 'canary') "
            f"AND {where_win}) x WHERE step IS NOT NULL GROUP BY arm, step")
    return {(r[0], int(r[1])): int(r[2]) for r in _run(conn, usql, params, wnames)}


def _rows_joined(conn: Any, dialect: str, model: str, windows: list[Window], policy: Policy,
                 look_at: datetime, thresholds: dict[str, float]) -> list[tuple]:
    """Rows as :func:`_rows_denormalized`, for logs without the label columns: label metrics join the
    latest feedback received by the look time (an anti-join per request; slower at scale)."""
    width = policy.cluster_seconds
    params: dict[str, Any] = {"model": model, "look_at": look_at, "cw": width}
    dts = ["look_at"]
    step_case, where_win, wnames = _windows_sql(windows, params)
    dts += wnames
    cols, aggs = [], []
    has_labels = False
    for i, m in enumerate(policy.metrics):
        cols.append(f"{_value_sql(m, i, dialect, params, thresholds)} AS v{i}")
        aggs.append(f"COUNT(v{i}), SUM(v{i}), SUM(v{i} * v{i})")
        if m.needs_labels:
            has_labels = True
            params[f"elig{i}"] = look_at - timedelta(seconds=m.label_delay_s)
            dts.append(f"elig{i}")
            need_pred = "" if m.source == "label" else " AND p.prediction IS NOT NULL"
            cols.append(f"CASE WHEN p.ts < :elig{i} AND p.status = 'ok'{need_pred} THEN 1 ELSE 0 END AS e{i}")
            aggs.append(f"SUM(e{i})")
    join = ""
    if has_labels:  # the latest label received by the look time (a later correction replaces it)
        join = ("LEFT JOIN feedback f ON f.request_id = p.request_id AND f.ts <= :look_at AND NOT EXISTS "
                "(SELECT 1 FROM feedback f2 WHERE f2.request_id = f.request_id AND f2.ts <= :look_at "
                "AND (f2.ts > f.ts OR (f2.ts = f.ts AND f2.label > f.label)))")
    sql = (f"SELECT arm, step, cluster, COUNT(*), {', '.join(aggs)} FROM ("
           f"SELECT p.arm AS arm, {step_case} AS step, {_bucket(dialect, width)} AS cluster, {', '.join(cols)} "
           f"FROM predictions p {join} WHERE p.model = :model AND p.arm IN ('stable', 'canary') "
           f"AND {where_win}) x WHERE step IS NOT NULL GROUP BY cluster, step, arm")
    return [(r[0], r[1], _bucket_int(r[2], width), *r[3:]) for r in _run(conn, sql, params, dts)]


def look_stats(bind: Any, model: str, windows: list[Window], policy: Policy, look_at: datetime,
               thresholds: dict[str, float] | None = None, count_units: bool = True,
               denormalized: bool | None = None) -> ArmStats:
    """Sufficient statistics of every metric for one look, grouped in the database by arm, step and time
    cluster (``policy.cluster_seconds`` wide, aligned to the epoch; the id is epoch seconds // width).

    Label metrics use the latest label received by ``look_at`` and count only predictions older than
    ``look_at - label_delay`` (both arms alike); their eligible and labelled counts per arm feed the
    labelled-share check. ``thresholds`` gives the milliseconds for ``baseline_p95`` latency metrics.
    ``count_units`` counts distinct units per arm and step for the SRM test (the routing is by unit;
    request counts of heavy users are over-dispersed); without it SRM counts requests.

    When the gateway keeps the latest label on the prediction row (``label``, ``label_ts``) and flags each
    unit's first request per route (``unit_first``; Contract 2), everything comes from one scan of the
    windows: on PostgreSQL one parallel hash aggregate, on SQLite one index range per cluster. Otherwise
    label metrics join ``feedback`` (latest label per request) and units are counted by a second
    ``COUNT(DISTINCT)`` scan; the numbers are the same. ``denormalized`` forces one way (None: detect).
    """
    windows = _check_windows(windows)
    thresholds = dict(thresholds or {})
    look_at = look_at.replace(tzinfo=None)
    with _connect(bind, snapshot=True) as conn:
        dialect = conn.dialect.name
        _bucket(dialect)  # names an unsupported database before any query
        have = log_columns(conn) if denormalized is None else set()
        labels_on_row = denormalized if denormalized is not None else set(LABEL_COLUMNS) <= have
        flags_on_row = denormalized if denormalized is not None else UNIT_COLUMN in have
        if dialect == "postgresql":
            # this transaction only, one round trip: hash aggregates in memory; JIT (compiled expressions and
            # tuple deforming, optimised but not inlined) for a one-scan look the planner costs above 120,000
            # (about 2.5M rows with four metrics): at 10M rows it cuts the scan by a quarter, below that
            # its ~0.1 s of compiling costs more than it saves; inlining (~0.2 s) never paid off, and the
            # join path never compiles
            jit = "120000" if labels_on_row else "-1"
            conn.execute(text("SELECT set_config('work_mem', '64MB', true), set_config('jit_above_cost', :jit, true), "
                              "set_config('jit_optimize_above_cost', :jit, true), "
                              "set_config('jit_inline_above_cost', '-1', true)"), {"jit": jit})
        units: dict[tuple[str, int], int] | None = None
        if labels_on_row:
            rows, units = _rows_denormalized(conn, dialect, model, windows, policy, look_at, thresholds,
                                             with_units=count_units and bool(flags_on_row))
        else:
            rows = _rows_joined(conn, dialect, model, windows, policy, look_at, thresholds)
        if count_units and units is None:
            units = _distinct_units(conn, model, windows)
        units = units or {}
    arr = np.array([[0 if r[0] == "stable" else 1, r[1], r[2], *[0 if v is None else v for v in r[3:]]]
                    for r in rows], dtype=float).reshape(len(rows), -1) if rows else None
    metrics: dict[str, MetricCells] = {}
    labels: dict[str, dict[str, Any]] = {}
    col = 4
    for m in policy.metrics:
        if arr is None:
            metrics[m.name] = MetricCells.from_arrays([], [], [], [], [], [])
        else:
            keep = arr[:, col] > 0
            a = arr[keep]
            metrics[m.name] = MetricCells.from_arrays(a[:, 0] == 1, a[:, 1], a[:, 2], a[:, col], a[:, col + 1],
                                                      a[:, col + 2])
        col += 3
        if m.needs_labels:
            lab: dict[str, Any] = {}
            empty = np.zeros((0, col + 1))
            for k, arm in enumerate(("stable", "canary")):
                sel = arr[arr[:, 0] == k] if arr is not None else empty
                lab[arm] = {"eligible": int(sel[:, col].sum()), "labelled": int(sel[:, col - 3].sum())}
            lab["steps"] = []
            for step in sorted({int(x) for x in arr[:, 1]}) if arr is not None else []:
                entry: dict[str, Any] = {"step": step}
                for k, arm in enumerate(("stable", "canary")):
                    sel = arr[(arr[:, 0] == k) & (arr[:, 1] == step)]
                    entry[arm] = {"eligible": int(sel[:, col].sum()), "labelled": int(sel[:, col - 3].sum())}
                lab["steps"].append(entry)
            labels[m.name] = lab
            col += 1
    pct = {w[0]: w[1] for w in windows}
    traffic = []
    if arr is not None:
        for step in sorted({int(s) for s in arr[:, 1]}):
            for k, arm in enumerate(("stable", "canary")):
                sel = (arr[:, 0] == k) & (arr[:, 1] == step)
                traffic.append({"step": step, "arm": arm, "requests": int(arr[sel, 3].sum()),
                                "units": units.get((arm, step), 0), "percent": pct.get(step)})
    return ArmStats(metrics=metrics, traffic=traffic, labels=labels, thresholds=thresholds)


def baseline(bind: Any, model: str, start: datetime, end: datetime, policy: Policy | None = None,
             quantile: float = 0.95) -> dict[str, Any]:
    """Stable's numbers over a reference window before the rollout: latency quantile (nearest rank, the
    same on every database), request count and, per non-label metric, its mean (base rate)."""
    start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    with _connect(bind) as conn:
        dialect = conn.dialect.name
        params: dict[str, Any] = {"model": model, "s": start, "e": end}
        dts = ["s", "e"]
        where = "p.model = :model AND p.arm = 'stable' AND p.ts >= :s AND p.ts < :e"
        n = _run(conn, f"SELECT COUNT(*) FROM predictions p WHERE {where}", params, dts)[0][0]
        out: dict[str, Any] = {"window": [start.isoformat(), end.isoformat()], "requests": int(n),
                               "latency_p95": None, "latency_p95_ms": None, "rates": {}}
        if not n:
            return out
        k = max(int(np.ceil(quantile * n)) - 1, 0)
        q = _run(conn, f"SELECT p.latency_ms FROM predictions p WHERE {where} ORDER BY p.latency_ms "
                       "LIMIT 1 OFFSET :k", {**params, "k": k}, dts)
        out["latency_p95"] = out["latency_p95_ms"] = float(q[0][0])
        if policy is not None:
            thr = {m.name: out["latency_p95"] for m in policy.metrics if m.threshold == "baseline_p95"}
            for i, m in enumerate(policy.metrics):
                if m.needs_labels:
                    continue
                p2: dict[str, Any] = dict(params)
                expr = _value_sql(m, i, dialect, p2, thr)
                r = _run(conn, f"SELECT AVG({expr}) FROM predictions p WHERE {where}", p2, dts)
                out["rates"][m.name] = None if r[0][0] is None else float(r[0][0])
    return out


#: SQLite's sample key: the rowid times the golden ratio of 2^31 - 1, modulo that prime (a Weyl sequence:
#: consecutive rows get keys spread over the whole range, so the smallest keys are spread over the window).
#: Exact in 64-bit integers for rowids below 6.9e9.
_WEYL = 1327217884
_KEY_RANGE = 2147483647


def _sample_key(dialect: str) -> str:
    """A deterministic per-row key in ``[0, 2^31 - 1)`` for the bottom-k sample of :func:`sample_rows`."""
    if dialect == "postgresql":
        return "(hashtext(p.request_id) & 2147483647)"
    return f"((p.rowid * {_WEYL}) % {_KEY_RANGE})"


def sample_key_cut(rows: int, limit: int) -> int:
    """The key below which a window of ``rows`` rows holds about ``1.2 * limit + 10 sqrt(limit)`` of them
    (the whole key range when the window is that small): the bottom-k samples sort only those rows."""
    want = 1.2 * limit + 10 * limit ** 0.5
    return _KEY_RANGE if rows <= want else int(_KEY_RANGE * want / rows) + 1


def sample_rows(bind: Any, model: str, start: datetime, end: datetime, arm: str | None = None,
                limit: int = 5000, arms: tuple[str, ...] = ("stable", "canary")) -> Any:
    """At most ``limit`` rows of one arm (or of ``arms``) in ``[start, end)`` as a DataFrame with the
    features JSON expanded into columns (prefixed ``f_`` when a name clashes with a log column).

    The sample is reproducible and drawn by the database: the ``limit`` rows with the smallest key, a
    hash of the request id (PostgreSQL ``hashtext``) or a Weyl sequence over the rowid (SQLite), so a retried
    look sees the same rows, and a window with fewer rows gives all of them. Only about ``1.2 * limit``
    candidates are sorted: the rows are counted first (one range of the ``(model, ts)`` index), and the
    scan keeps a row only when its key is below the share of the key range that holds about ``1.2 *
    limit + 10 sqrt(limit)`` rows. That is a pass over the window without a sort of all its rows, about
    half the time of ``ORDER BY random()``, which also gave another sample on every call. Sizes: the
    spec's ``data_quality.sample_size`` (5,000 rows) and ``drift.sample_size`` (20,000 rows).
    """
    import pandas as pd

    if limit <= 0:
        raise ValueError(f"limit={limit!r}: the sample size must be a positive number of rows")
    chosen = (arm,) if arm else arms
    start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    with _connect(bind) as conn:
        dialect = conn.dialect.name
        params: dict[str, Any] = {"model": model, "s": start, "e": end, "lim": int(limit)}
        names = []
        for i, a in enumerate(chosen):
            params[f"a{i}"] = a
            names.append(f":a{i}")
        where = f"p.model = :model AND p.arm IN ({', '.join(names)}) AND p.ts >= :s AND p.ts < :e"
        n = _run(conn, f"SELECT COUNT(*) FROM predictions p WHERE {where}", params, ["s", "e"])[0][0]
        params["kmax"] = sample_key_cut(n, limit)
        key = _sample_key(dialect)
        sql = ("SELECT p.request_id, p.ts, p.arm, p.version, p.unit_id, p.features, p.prediction, p.score, "
               f"p.latency_ms, p.status FROM predictions p WHERE {where} AND {key} < :kmax "
               f"ORDER BY {key}, p.request_id LIMIT :lim")
        rows = [tuple(r) for r in _run(conn, sql, params, ["s", "e"])]
    cols = ["request_id", "ts", "arm", "version", "unit_id", "features", "prediction", "score", "latency_ms",
            "status"]
    df = pd.DataFrame(rows, columns=cols)
    # one JSON document for all rows: the C decoder once instead of a Python call per row
    docs = json.loads("[" + ",".join(f or "{}" for f in df["features"]) + "]")
    feats = pd.DataFrame([d or {} for d in docs], index=df.index)
    feats.columns = [f"f_{c}" if c in cols else c for c in feats.columns]
    return pd.concat([df.drop(columns=["features"]), feats], axis=1)


def arm_counts(bind: Any, model: str, start: datetime, end: datetime) -> dict[str, dict[str, int]]:
    """Requests and errors per arm in ``[start, end)``: cheap enough for the hold sensor's every poke."""
    with _connect(bind) as conn:
        rows = _run(conn, "SELECT arm, COUNT(*), SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) FROM predictions "
                          "WHERE model = :model AND ts >= :s AND ts < :e GROUP BY arm",
                    {"model": model, "s": start.replace(tzinfo=None), "e": end.replace(tzinfo=None)}, ["s", "e"])
    return {r[0]: {"requests": int(r[1]), "errors": int(r[2] or 0)} for r in rows}


def histogram(bind: Any, model: str, windows: list[Window], column: str, edges: list[float]) -> dict[str, list[int]]:
    """Counts per arm of ``column`` (``score``, ``prediction`` or ``latency_ms``) in the bins cut by
    ``edges`` (bin i holds edges[i-1] <= x < edges[i]; NULLs left out), computed in the database."""
    if column not in ("score", "prediction", "latency_ms"):
        raise ValueError(f"column={column!r}: histograms are computed for score, prediction or latency_ms")
    windows = _check_windows(windows)
    params: dict[str, Any] = {"model": model}
    step_case, where_win, wnames = _windows_sql(windows, params)
    where_win = f"{where_win} AND ({step_case}) IS NOT NULL"
    parts = []
    for i, e in enumerate(edges):
        params[f"edge{i}"] = float(e)
        parts.append(f"WHEN p.{column} < :edge{i} THEN {i}")
    bin_sql = f"CASE {' '.join(parts)} ELSE {len(edges)} END"
    with _connect(bind) as conn:
        rows = _run(conn, f"SELECT p.arm, {bin_sql} AS b, COUNT(*) FROM predictions p WHERE p.model = :model AND "
                          f"p.{column} IS NOT NULL AND {where_win} GROUP BY 1, 2", params, wnames)
    out: dict[str, list[int]] = {}
    for arm, b, c in rows:
        out.setdefault(arm, [0] * (len(edges) + 1))[int(b)] += int(c)
    return out
