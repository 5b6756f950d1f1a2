"""Scale of one look: the full analysis against a plain aggregate scan, on SQLite and PostgreSQL.

Run:  PYTHONPATH=include:plugins .venv/bin/python benchmarks/analysis_scale.py [--rows 1000000 10000000]
      [--backends sqlite postgresql] [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/test]

For each row count and backend it generates a prediction log inside the database (PostgreSQL:
``generate_series``; SQLite: a recursive CTE), with the gateway's own schema (Contract 2) plus the optional
row columns ``label``, ``label_ts`` and ``unit_first`` filled as the gateway keeps them; sticky units
(unit = g * 7919 mod 100000, deterministic so SQLite cannot re-draw it; the unit decides the arm, as the
gateway's hash routing does), a ramp 1 -> 5 -> 25 -> 50 % over four one-hour steps, 2 % errors, feedback
for 30 % of the requests 60 s after the prediction, and about 0.1 % of those labels corrected 10 minutes
after the look (so the look has to read their earlier label from the feedback history). Then, in the
same run and each in a fresh process (so peak memory is the phase's own):

* ``plain scan``: ``SELECT arm, count(*), avg(latency_ms) FROM predictions WHERE model = ? AND ts in the
  rollout GROUP BY arm`` (the baseline, over the same rows);
* ``analysis``: one full look: ``canary.analysis.sql.look_stats`` plus ``judge``, four metrics (error
  rate, latency exceedance, score, and the mistake rate from the latest label received by the look, with
  a 60 s label delay), per arm, step and minute; labelled-share counts; distinct units per arm and step
  for SRM (from the ``unit_first`` flags);
* ``analysis, join+distinct``: the same look for a log without the row columns
  (``look_stats(..., denormalized=False)``): the latest label per request by an anti-join on ``feedback``
  and a second ``COUNT(DISTINCT unit_id)`` scan;
* ``analysis + samples``: the one-scan look plus the data-quality sample (5,000 canary rows) validated
  with Great Expectations and the drift sample (20,000 rows of both arms) compared between arms.

It prints wall time (best of ``--repeat`` rounds that alternate the phases), the ratio to the plain scan and the peak RSS of the Python
process (SQLite runs in process, so its memory is included; the PostgreSQL server's own memory is not).
Targets (issue 4): the analysis takes <= 2x the plain scan; peak memory <= 500 MB at 10M rows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta

# The rollout starts 17 s past a minute, as a real one does: its step edges and the label eligibility time
# cut clusters, so the look's cells are not only the cluster grid.
T0 = datetime(2026, 1, 1, 0, 0, 17)
STEPS = (1.0, 5.0, 25.0, 50.0)
DURATION_S = 4 * 3600  # four one-hour steps


def windows(look_at: datetime | None = None):
    step = timedelta(seconds=DURATION_S / 4)
    return [(k, p, T0 + k * step, T0 + (k + 1) * step) for k, p in enumerate(STEPS)]


def policy():
    from canary.analysis import MetricPolicy, Policy

    return Policy(metrics=(
        MetricPolicy("error_rate", "error", critical=True, margin=0.1, margin_type="relative"),
        MetricPolicy("latency_p95_exceed", "latency_ms", kind="latency_threshold", threshold=105.0, margin=0.02),
        MetricPolicy("score", "score", kind="continuous", margin=0.05),
        MetricPolicy("mistake_rate", "mismatch", margin=0.1, margin_type="relative", label_delay_s=60),
    ), planned_canary_samples=1_000_000)


# The gateway's row columns for one-scan looks (Contract 2, optional): the latest label and its time, and
# the unit's first request per route generation; an index on feedback(ts) finds labels that arrived after
# the look. The log is generated with them filled as the gateway keeps them; the ``analysis,
# join+distinct`` phase ignores them and reads ``feedback`` instead.
ROW_COLUMNS = ("ALTER TABLE predictions ADD COLUMN label DOUBLE PRECISION",
               "ALTER TABLE predictions ADD COLUMN label_ts TIMESTAMP",
               "ALTER TABLE predictions ADD COLUMN unit_first SMALLINT",
               "CREATE INDEX ix_feedback_ts ON feedback (ts)")
# Feedback for 30 % of the requests, 60 s after the prediction, label 0/1: deterministic in g so that
# SQLite (which re-draws random() per reference) writes the same label to the row and to feedback.
LABELLED = "(({g} * 2654435761) % 1000) < 300"
LABEL = "(({g} * 40503) % 1009) % 2"
LABEL_AFTER_S = 60
# About 0.1 % of the labels are corrected (flipped) 10 minutes after the look: the row keeps the correction,
# so the look must read the label it had at the look time from the feedback history (about what arrives
# between the recorded look time and the analysis a few seconds later; each such label costs the look two
# index look-ups, so a retry hours later pays more).
CORRECTED = "({g} % 997) = 0"
CORRECTED_AFTER_LOOK_S = 600
# Units cycle every 100,000 requests (u = g * 7919 mod 100000 is a bijection on each block of 100,000 g), so
# a unit's first request in a step is among the step's first 100,000 requests; a step starts at
# g = ceil(step * n / 4).
UNIT_FIRST = "CASE WHEN {g} - ((({g} * 4 / {n}) * {n} + 3) / 4) < 100000 THEN 1 ELSE 0 END"


def generate_sqlite(path: str, n: int) -> None:
    import sqlite3

    from gateway.store import create_schema
    from sqlalchemy import create_engine

    eng = create_engine(f"sqlite:///{path}")
    create_schema(eng)
    eng.dispose()
    con = sqlite3.connect(path)
    for ddl in ROW_COLUMNS:
        con.execute(ddl)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("DROP INDEX IF EXISTS ix_predictions_model_ts")
    epoch0 = int((T0 - datetime(1970, 1, 1)).total_seconds())
    con.execute(f"""
        WITH RECURSIVE s(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM s WHERE g < {n - 1})
        INSERT INTO predictions
        SELECT 'r' || g,
               strftime('%Y-%m-%d %H:%M:%S', {epoch0} + (g * {DURATION_S}) / {n}, 'unixepoch') || '.000000',
               'fraud', CASE WHEN c THEN 'v2' ELSE 'v1' END, CASE WHEN c THEN 'canary' ELSE 'stable' END,
               'u' || u,
               '{{"amount": ' || (abs(random()) % 1000) || ', "country": ' || (abs(random()) % 5) || '}}',
               abs(random()) % 2, (abs(random()) % 1000) / 1000.0, 10 + (abs(random()) % 1000) / 10.0,
               CASE WHEN abs(random()) % 100 < 2 THEN 'error' ELSE 'ok' END, NULL,
               CASE WHEN {LABELLED.format(g="g")} THEN abs(({CORRECTED.format(g="g")}) - {LABEL.format(g="g")}) END,
               CASE WHEN {LABELLED.format(g="g")} THEN strftime('%Y-%m-%d %H:%M:%S', CASE
                    WHEN {CORRECTED.format(g="g")} THEN {epoch0 + DURATION_S + CORRECTED_AFTER_LOOK_S}
                    ELSE {epoch0} + (g * {DURATION_S}) / {n} + {LABEL_AFTER_S} END, 'unixepoch') || '.000000' END,
               {UNIT_FIRST.format(g="g", n=n)}
        FROM (SELECT g, u, (u % 10000) < CASE g * 4 / {n} WHEN 0 THEN 100 WHEN 1 THEN 500
                                         WHEN 2 THEN 2500 ELSE 5000 END AS c
              FROM (SELECT g, (g * 7919) % 100000 AS u FROM s))
    """)
    late = (T0 + timedelta(seconds=DURATION_S)).isoformat(sep=" ")
    con.execute(f"""INSERT INTO feedback SELECT request_id, CASE WHEN label_ts > '{late}' THEN
                    strftime('%Y-%m-%d %H:%M:%S', ts, '+{LABEL_AFTER_S} seconds') || '.000000' ELSE label_ts END,
                    CASE WHEN label_ts > '{late}' THEN 1 - label ELSE label END, NULL, 'sim' FROM predictions
                    WHERE label IS NOT NULL""")
    con.execute(f"""INSERT INTO feedback SELECT request_id, label_ts, label, NULL, 'correction' FROM predictions
                    WHERE label_ts > '{late}'""")
    con.execute("CREATE INDEX ix_predictions_model_ts ON predictions (model, ts)")
    con.execute("ANALYZE")
    con.commit()
    con.close()


def generate_pg(url: str, n: int) -> None:
    from gateway.store import create_schema
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    create_schema(eng)
    dt = DURATION_S / n
    with eng.begin() as c:
        for ddl in ROW_COLUMNS:
            c.execute(text(ddl))
        c.execute(text("DROP INDEX IF EXISTS ix_predictions_model_ts"))
        c.execute(text(f"""
            INSERT INTO predictions
            SELECT 'r' || g, TIMESTAMP '{T0.isoformat(sep=' ')}' + make_interval(secs => floor(g * {dt})),
                   'fraud', CASE WHEN c THEN 'v2' ELSE 'v1' END, CASE WHEN c THEN 'canary' ELSE 'stable' END,
                   'u' || u,
                   '{{"amount": ' || floor(random() * 1000)::int || ', "country": ' || floor(random() * 5)::int || '}}',
                   floor(random() * 2), floor(random() * 1000) / 1000.0, 10 + floor(random() * 1000) / 10.0,
                   CASE WHEN random() < 0.02 THEN 'error' ELSE 'ok' END, NULL,
                   CASE WHEN {LABELLED.format(g="g")} THEN abs(({CORRECTED.format(g="g")})::int
                        - {LABEL.format(g="g")}) END,
                   CASE WHEN {LABELLED.format(g="g")} THEN TIMESTAMP '{T0.isoformat(sep=' ')}' + make_interval(
                        secs => CASE WHEN {CORRECTED.format(g="g")} THEN {DURATION_S + CORRECTED_AFTER_LOOK_S}
                                     ELSE floor(g * {dt}) + {LABEL_AFTER_S} END) END,
                   {UNIT_FIRST.format(g="g", n=n)}
            FROM (SELECT g, u, (u % 10000) < CASE (g * 4 / {n}) WHEN 0 THEN 100 WHEN 1 THEN 500 WHEN 2 THEN 2500
                                      ELSE 5000 END AS c
                  FROM (SELECT g::bigint AS g, (g::bigint * 7919) % 100000 AS u
                        FROM generate_series(0, {n - 1}) g) r) s
        """))
        late = (T0 + timedelta(seconds=DURATION_S)).isoformat(sep=" ")
        c.execute(text(f"""INSERT INTO feedback SELECT request_id, CASE WHEN label_ts > '{late}' THEN
                           ts + interval '{LABEL_AFTER_S} seconds' ELSE label_ts END, CASE WHEN label_ts > '{late}'
                           THEN 1 - label ELSE label END, NULL, 'sim' FROM predictions WHERE label IS NOT NULL"""))
        c.execute(text(f"""INSERT INTO feedback SELECT request_id, label_ts, label, NULL, 'correction'
                           FROM predictions WHERE label_ts > '{late}'"""))
        c.execute(text("CREATE INDEX ix_predictions_model_ts ON predictions (model, ts)"))
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE predictions"))
        c.execute(text("VACUUM ANALYZE feedback"))
    eng.dispose()


def _phase(url: str, phase: str, q) -> None:
    import resource

    sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    import pandas  # noqa: F401 - imports are not part of a look's cost (a worker has them loaded)
    import scipy.stats  # noqa: F401
    from canary.analysis import judge
    from canary.analysis.sql import look_stats, sample_rows
    from sqlalchemy import create_engine, text

    if phase == "analysis + samples":
        import great_expectations  # noqa: F401
        from canary.analysis.drift import compare_arms
        from canary.analysis.quality import validate
    eng = create_engine(url)
    w = windows()
    look_at = w[-1][3]
    t = time.perf_counter()
    if phase == "plain scan":
        with eng.connect() as c:
            from sqlalchemy import DateTime, bindparam

            stmt = text("SELECT arm, count(*), avg(latency_ms) FROM predictions WHERE model = :m AND ts >= :s "
                        "AND ts < :e GROUP BY arm").bindparams(bindparam("s", type_=DateTime()),
                                                               bindparam("e", type_=DateTime()))
            rows = c.execute(stmt, {"m": "fraud", "s": T0, "e": look_at}).fetchall()
        detail = f"{sum(r[1] for r in rows)} rows"
    else:
        pol = policy()
        joined = phase == "analysis, join+distinct"
        stats = look_stats(eng, "fraud", w, pol, look_at, denormalized=False if joined else None)
        v = judge(stats, pol, None, is_last_step=True)
        detail = f"decision {v.decision}, {sum(stats.metrics['error_rate'].n):.0f} rows ({v.reason[:70]})"
        if phase == "analysis + samples":
            dq_rows = sample_rows(eng, "fraud", w[-1][2], look_at, arm="canary", limit=5000)
            suite = {"name": "scale", "expectations": [
                {"type": "expect_column_values_to_be_between", "kwargs": {"column": "score", "min_value": 0,
                                                                          "max_value": 1}},
                {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "prediction",
                                                                         "value_set": [0, 1]}},
                {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "amount"}}]}
            dq = validate(dq_rows, suite)
            dr = compare_arms(sample_rows(eng, "fraud", w[-1][2], look_at, limit=20000),
                              columns=["amount", "country"])
            detail += f", dq {'ok' if dq['success'] else 'failed'}, drift {dr['drifted']}"
    elapsed = time.perf_counter() - t
    eng.dispose()
    q.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, detail))


def measure(url: str, phase: str) -> tuple[float, float, str]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_phase, args=(url, phase, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--pg-url", default=os.environ.get("CANARY_TEST_PG_URL",
                                                       "postgresql+psycopg2://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the phases (the best time is shown)")
    args = ap.parse_args(argv)
    from sqlalchemy import create_engine, text

    print(f"{'backend':<11} {'rows':>10} {'phase':<26} {'seconds':>8} {'x plain':>8} {'peak MB':>8}  detail")
    ok = True
    for n in args.rows:
        for backend in args.backends:
            tmp = None
            admin = None
            if backend == "sqlite":
                tmp = tempfile.mkdtemp(prefix="canary-scale-")
                url = f"sqlite:///{tmp}/log.db"
                gen, gen_args = generate_sqlite, (f"{tmp}/log.db", n)
            else:
                admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
                db = f"canary_scale_{uuid.uuid4().hex[:8]}"
                with admin.connect() as c:
                    c.execute(text(f'CREATE DATABASE "{db}"'))
                url = args.pg_url.rsplit("/", 1)[0] + "/" + db
                gen, gen_args = generate_pg, (url, n)
            try:
                t = time.perf_counter()
                gen(*gen_args)
                print(f"{backend:<11} {n:>10} {'generate':<26} {time.perf_counter() - t:>8.1f}", flush=True)
                base = None
                phases = ("plain scan", "analysis", "analysis, join+distinct", "analysis + samples")
                # rounds alternate the phases, so a load change on the shared machine hits them alike
                by_phase: dict[str, list] = {ph: [] for ph in phases}
                for _ in range(args.repeat):
                    for phase in phases:
                        by_phase[phase].append(measure(url, phase))
                for phase in phases:
                    runs = by_phase[phase]
                    sec = min(r[0] for r in runs)
                    peak = max(r[1] for r in runs)
                    base = sec if phase == "plain scan" else base
                    ratio = sec / base
                    print(f"{backend:<11} {n:>10} {phase:<26} {sec:>8.2f} {ratio:>8.2f} {peak:>8.0f}  {runs[0][2]}",
                          flush=True)
                    if phase == "analysis":
                        ok &= ratio <= 2.0
                    if n >= 10_000_000:
                        ok &= peak <= 500
            finally:
                if tmp:
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
                if admin is not None:
                    with admin.connect() as c:
                        c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                    admin.dispose()
    print("targets: analysis <= 2x plain scan; peak <= 500 MB at 10M rows:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
