"""Aggregations inside the database for one look, the pre-rollout baseline and the hold sensor.

Every function takes a SQLAlchemy ``Connection`` or ``Engine`` (the Airflow ``PredictionLogHook`` gives an
engine via ``get_sqlalchemy_engine()``) and reads the Contract 2 tables ``predictions`` and ``feedback``.
SQL is parameterized (values are bound, never formatted in); identifiers are fixed. The same queries run on
SQLite and PostgreSQL and give identical numbers: only the time-cluster expression differs by dialect.

``windows`` are ``[(step_index, percent, start_ts, end_ts), ...]`` from the recorded ``step_started_at``
and ``look_at`` (naive UTC datetimes): a row belongs to a step when ``start <= ts < end``.

Rows are never all loaded: :func:`look_stats` returns one row per (arm, step, time cluster) with counts,
sums and sums of squares per metric (clusters are ``policy.cluster_seconds`` wide, aligned to the epoch:
cluster id = epoch seconds // width, so width 60 gives the epoch minutes); :func:`sample_rows` returns at
most ``limit`` rows (random order, drawn by the database) for data quality and drift.
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
def _connect(bind: Any):
    """Yield a Connection from an Engine or pass a Connection through (never closing the caller's)."""
    if hasattr(bind, "connect") and not hasattr(bind, "execute"):
        with bind.connect() as conn:
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


def _row_value_sql(m: MetricPolicy, i: int, dialect: str, params: dict[str, Any],
                   thresholds: dict[str, float]) -> tuple[str, str | None]:
    """(value, eligible count) SQL of metric ``m`` reading the label kept on the prediction row.

    The value is NULL when the request is not observable. A label metric takes ``p.label`` when it was
    received by the look time (``p.label_ts <= :look_at``); rows whose label was replaced after the look
    are added by :func:`_add_late_labels`. The label delay is not tested per row: the cells are cut at the
    eligibility time, and the caller keeps label counts only of cells before it.
    """
    if not m.needs_labels:
        if m.kind == "latency_threshold" or m.source == "error":
            _value_sql(m, i, dialect, params, thresholds)  # binds the threshold
            cond = f"p.latency_ms > :thr{i}" if m.kind == "latency_threshold" else "p.status = 'error'"
            return _bool(dialect, cond), None
        if m.source == "null_score":
            return f"CASE WHEN p.status = 'ok' THEN {_bool(dialect, _nan_check(dialect, 'p.score'))} END", None
        return _value_sql(m, i, dialect, params, thresholds), None
    elig = _eligible_sql(m, i, by_time=False)
    value = _label_value(m, dialect, "p.label")
    return f"CASE WHEN {elig} AND p.label_ts <= :look_at THEN {value} END", _bool(dialect, elig)


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
                       look_at: datetime, thresholds: dict[str, float], with_units: bool
                       ) -> tuple[list[tuple], dict[tuple[str, int], int] | None]:
    """One scan: rows (arm, step, cluster, requests, per metric n/s1/s2 [+ eligible]) and, when the
    ``unit_first`` flag is set on every row with a unit id, distinct units per (arm, step).

    The windows are cut into cells at every cluster boundary (``policy.cluster_seconds``), window edge and
    label eligibility time (``look_at - label_delay``), so a cell is wholly old enough for a label metric or
    wholly not; label counts of cells that are not are set to zero here, and no per-row time test is needed.
    The cluster of a cell is known from its bounds, so no per-row time expression is computed either.
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
        v, elig = _row_value_sql(m, i, dialect, params, thresholds)
        always = not m.needs_labels and (m.kind == "latency_threshold" or m.source == "error")
        aggs += ([] if always else [f"COUNT({v})"]) + [f"SUM({v})"]  # always observed: n = requests
        if not _binary(m):
            aggs.append(f"SUM(({v}) * ({v}))")
        if elig is not None:
            aggs.append(f"SUM({elig})")
        shape.append((i, always, _binary(m), elig is not None))
    if label_idx:  # labels replaced after the look time (their earlier label is read from feedback)
        aggs.append("COUNT(CASE WHEN p.label_ts > :look_at THEN 1 END)")
    if with_units:
        aggs += [f"COUNT(CASE WHEN p.{UNIT_COLUMN} IS NULL THEN p.unit_id END)", f"SUM(p.{UNIT_COLUMN})"]
    pts, cells = _cell_grid(windows, tuple(elig_at.values()), policy.cluster_seconds)
    raw: list[tuple] = []  # (arm, step, cluster, lo, aggregates...)
    if dialect == "postgresql":  # one parallel aggregate; the cell is a binary search over the cut points
        params["cuts"] = pts
        sql = (f"SELECT p.arm, width_bucket(p.ts, CAST(:cuts AS timestamp[])) AS cell, {', '.join(aggs)} "
               "FROM predictions p WHERE p.model = :model AND p.ts >= :wlo AND p.ts < :whi GROUP BY 1, 2")
        params["wlo"], params["whi"] = pts[0], pts[-1]
        for r in _run(conn, sql, params, [*dts, "wlo", "whi"]):
            j = int(r[1]) - 1  # width_bucket: 1 for [pts[0], pts[1])
            if r[0] in ("stable", "canary") and 0 <= j < len(cells) and cells[j] is not None:
                raw.append((r[0], *cells[j], pts[j], *r[2:]))
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
    rows, unit_parts, late = [], [], 0
    for r in raw:
        out, k = [r[0], r[1], r[2], r[4]], 5
        for i, always, binary, has_elig in shape:
            n = r[4] if always else r[k]
            k += 0 if always else 1
            s1 = r[k]
            k += 1
            s2 = s1 if binary else r[k]
            k += 0 if binary else 1
            e = r[k] if has_elig else None
            k += 1 if has_elig else 0
            if has_elig and r[3] >= elig_at[i]:  # the cell is younger than the label delay
                n = s1 = s2 = e = 0
            out += [n, s1, s2] + ([e] if has_elig else [])
        rows.append(out)
        if label_idx:
            late += (r[k] or 0) if any(r[3] < elig_at[i] for i in label_idx) else 0
            k += 1
        if with_units:
            unit_parts.append((r[0], int(r[1]), r[k] or 0, r[k + 1] or 0))
    rows = _merge(rows)
    if late:
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
    """Add the label metrics of rows whose kept label arrived after the look time: their label is the latest
    one received by the look (from the ``feedback`` history, only for requests with feedback after it)."""
    params = dict(params)
    width = params["cw"] = policy.cluster_seconds
    step_case, where_win, wnames = _windows_sql(windows, params)
    aggs, pos = [], []
    col = 4
    for i, m in enumerate(policy.metrics):
        if m.needs_labels:
            v = f"CASE WHEN {_eligible_sql(m, i)} THEN {_label_value(m, dialect, 'lf.label')} END"
            aggs += [f"COUNT({v})", f"SUM({v})", f"SUM(({v}) * ({v}))"]
            pos.append(col)
        col += 4 if m.needs_labels else 3
    # requests with feedback after the look; for them the latest label received by the look (one row each:
    # the largest ts, ties: the larger label), joined once (no per-row subquery)
    sql = ("WITH late AS (SELECT DISTINCT f.request_id FROM feedback f WHERE f.ts > :look_at), "
           "by_look AS (SELECT f.request_id, f.label, ROW_NUMBER() OVER (PARTITION BY f.request_id "
           "ORDER BY f.ts DESC, f.label DESC) AS rn FROM feedback f WHERE f.ts <= :look_at "
           "AND f.request_id IN (SELECT request_id FROM late)) "
           f"SELECT p.arm, {step_case} AS step, {_bucket(dialect, width)} AS cluster, {', '.join(aggs)} "
           "FROM predictions p LEFT JOIN by_look lf ON lf.request_id = p.request_id AND lf.rn = 1 "
           "WHERE p.request_id IN (SELECT request_id FROM late) AND p.label_ts > :look_at AND p.model = :model "
           f"AND p.arm IN ('stable', 'canary') AND {where_win} GROUP BY 1, 2, 3")
    index = {(r[0], int(r[1]), int(r[2])): r for r in rows}
    for r in _run(conn, sql, params, dts + wnames):
        if r[1] is None:
            continue
        target = index[(r[0], int(r[1]), _bucket_int(r[2], width))]
        for j, c in enumerate(pos):
            for d in range(3):
                target[c + d] = (target[c + d] or 0) + (r[3 + 3 * j + d] or 0)
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
    with _connect(bind) as conn:
        dialect = conn.dialect.name
        _bucket(dialect)  # names an unsupported database before any query
        have = log_columns(conn) if denormalized is None else set()
        labels_on_row = denormalized if denormalized is not None else set(LABEL_COLUMNS) <= have
        flags_on_row = denormalized if denormalized is not None else UNIT_COLUMN in have
        if dialect == "postgresql":  # this transaction only, one round trip: hash aggregates in memory; JIT
            # (compiled expressions and tuple deforming) pays for its ~0.2 s of compiling only on large scans,
            # so only where the server would also inline and optimise (never for the join)
            conn.execute(text("SELECT set_config('work_mem', '64MB', true), set_config('jit_above_cost', :jit, true)"),
                         {"jit": "500000" if labels_on_row else "-1"})
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


def sample_rows(bind: Any, model: str, start: datetime, end: datetime, arm: str | None = None,
                limit: int = 5000, arms: tuple[str, ...] = ("stable", "canary")) -> Any:
    """At most ``limit`` random rows of one arm (or of ``arms``) in ``[start, end)`` as a DataFrame with
    the features JSON expanded into columns (prefixed ``f_`` when a name clashes with a log column).

    The database draws the sample (``ORDER BY random() LIMIT``), so only ``limit`` rows travel; the
    scan itself reads the window once.
    """
    import pandas as pd

    if limit <= 0:
        raise ValueError(f"limit={limit!r}: the sample size must be a positive number of rows")
    chosen = (arm,) if arm else arms
    start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    with _connect(bind) as conn:
        params: dict[str, Any] = {"model": model, "s": start, "e": end, "lim": int(limit)}
        names = []
        for i, a in enumerate(chosen):
            params[f"a{i}"] = a
            names.append(f":a{i}")
        sql = ("SELECT request_id, ts, arm, version, unit_id, features, prediction, score, latency_ms, status "
               f"FROM predictions p WHERE model = :model AND arm IN ({', '.join(names)}) AND ts >= :s AND ts < :e "
               "ORDER BY random() LIMIT :lim")
        rows = _run(conn, sql, params, ["s", "e"])
    cols = ["request_id", "ts", "arm", "version", "unit_id", "features", "prediction", "score", "latency_ms",
            "status"]
    df = pd.DataFrame(rows, columns=cols)
    feats = pd.DataFrame([json.loads(f) if f else {} for f in df["features"]], index=df.index)
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
