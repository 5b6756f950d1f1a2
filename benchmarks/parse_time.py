"""Parse-time cost of the rollout DAG file: 50 generated specs vs ``import airflow.sdk`` alone.

Airflow re-parses every DAG file every ``min_file_process_interval`` seconds (30 s by default), so the DAG
file must stay cheap. This benchmark, in one run:

1. generates N rollout specs (default 50, varied: 2-5 steps, 1-4 metrics, some scheduled, some pausing) into
   a temporary folder and points the DAG file at it with ``CANARY_ROLLOUTS_DIR``;
2. times, in fresh interpreter processes (several repetitions, median):
   - baseline: ``import airflow.sdk`` alone;
   - dag file: ``import airflow.sdk`` then importing ``dags/canary_rollouts.py`` (end to end);
   and, inside the dag-file process, the import of the DAG file alone once ``airflow.sdk`` is loaded;
3. checks what parsing touched: pandas, scipy, Great Expectations, scikit-learn, matplotlib or a database
   driver in ``sys.modules``, SQLAlchemy engines created, sockets connected.

Target: at most 0.5 s added for 50 specs, and nothing heavy touched. Exit status 1 when a target is missed.
The target is checked on the CPU time of the parsing process (``time.process_time``), which other jobs on a
shared machine inflate far less than wall time; wall times are printed next to it.

Run: ``PYTHONPATH=include:plugins .venv/bin/python benchmarks/parse_time.py [--specs 50] [--repeat 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "canary_rollouts.py"
HEAVY = ("pandas", "scipy", "great_expectations", "sklearn", "matplotlib", "psycopg2", "pyarrow")
TARGET_ADDED_S = 0.5

BASELINE_CODE = """
import time
t0, c0 = time.perf_counter(), time.process_time()
import airflow.sdk  # noqa: F401
t1, c1 = time.perf_counter(), time.process_time()
import json
print(json.dumps({"sdk_s": t1 - t0, "sdk_cpu": c1 - c0}))
"""

DAG_CODE = """
import json, runpy, socket, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import airflow.sdk  # noqa: F401
t1, c1 = time.perf_counter(), time.process_time()

# Count what parsing the DAG file touches (installed after airflow.sdk so only the DAG file is counted).
engines, connects = [], []
import sqlalchemy, sqlalchemy.engine, sqlalchemy.engine.create as _create
_real = _create.create_engine
def _counting_create_engine(*a, **k):
    engines.append(str(a[0]) if a else "?")
    return _real(*a, **k)
sqlalchemy.create_engine = sqlalchemy.engine.create_engine = _create.create_engine = _counting_create_engine
_real_connect = socket.socket.connect
def _counting_connect(self, address):
    connects.append(repr(address))
    return _real_connect(self, address)
socket.socket.connect = _counting_connect
before = set(sys.modules)

t2, c2 = time.perf_counter(), time.process_time()
namespace = runpy.run_path(DAG_FILE)
t3, c3 = time.perf_counter(), time.process_time()
hook_cpu = c2 - c1  # installing the counters above; not part of either measurement

dags = sorted(k for k in namespace if k.startswith("canary_rollout__"))
broken = [k for k in dags if "broken-spec" in namespace[k].tags]
tasks = sum(len(namespace[k].tasks) for k in dags)
new = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print(json.dumps({
    "sdk_s": t1 - t0, "total_s": t3 - t0 - (t2 - t1), "dag_file_s": t3 - t2,
    "sdk_cpu": c1 - c0, "total_cpu": c3 - c0 - hook_cpu, "dag_file_cpu": c3 - c2, "dags": len(dags), "broken": broken,
    "tasks": tasks, "heavy": [m for m in HEAVY if m in sys.modules], "engines": engines, "connects": connects,
    "new_top_level_modules": new,
}))
"""


def generate_specs(folder: Path, n: int) -> None:
    """``n`` valid specs, varied in size like real teams' specs."""
    metric_lines = [
        "  - {name: error_rate, source: error, kind: binary, margin: 0.002, critical: true}",
        "  - {name: slow_share, source: latency_ms, kind: latency_threshold, threshold: baseline_p95, margin: 0.02}",
        "  - {name: mistake_rate, source: mismatch, kind: binary, margin: 0.1, margin_type: relative, label_delay: 1m}",
        "  - {name: abs_error, source: abs_error, kind: continuous, margin: 0.05, margin_type: relative}",
    ]
    step_sets = ([5, 50], [1, 10, 50], [1, 5, 25, 50], [1, 5, 10, 25, 50])
    for i in range(n):
        name = f"model_{i:03d}"
        steps = step_sets[i % len(step_sets)]
        metrics = "\n".join(metric_lines[: 1 + i % len(metric_lines)])
        extra = ""
        if i % 3 == 0:
            extra += "schedule: '0 2 * * *'\n"
        if i % 4 == 0:
            extra += "on_inconclusive: pause\n"
        text = textwrap.dedent(
            f"""\
            model: {name}
            description: Generated spec {i} for the parse-time benchmark.
            owner: team-{i % 7}
            steps: {steps}
            hold: {{min_duration: 10m, min_samples: 500, max_wait: 2h, poll_interval: 30s}}
            data_quality: {{suite: {name}, sample_size: 5000}}
            tags: [bench]
            """
        )
        (folder / f"{name}.yaml").write_text(text + "metrics:\n" + metrics + "\n" + extra, encoding="utf-8")


def run(code: str, env: dict[str, str]) -> dict:
    prelude = f"DAG_FILE = {str(DAG_FILE)!r}\nHEAVY = {HEAVY!r}\n"
    out = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=50, help="number of generated specs (default 50)")
    parser.add_argument("--repeat", type=int, default=7, help="fresh processes per measurement (default 7)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="canary-parse-") as tmp:
        tmp_path = Path(tmp)
        specs = tmp_path / "rollouts"
        specs.mkdir()
        generate_specs(specs, args.specs)
        env = dict(os.environ)
        env.update(
            {
                "CANARY_ROLLOUTS_DIR": str(specs),
                "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "GX_ANALYTICS_ENABLED": "False",
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO / "include"), str(REPO / "plugins"), env.get("PYTHONPATH", "")]
                ),
            }
        )
        run(BASELINE_CODE, env)  # warm the OS file cache once; not counted
        baseline, dag = [], []
        for _ in range(args.repeat):  # interleaved so background load hits both alike
            baseline.append(run(BASELINE_CODE, env))
            dag.append(run(DAG_CODE, env))

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    sdk_wall, sdk_cpu = med(baseline, "sdk_s"), med(baseline, "sdk_cpu")
    total_wall, total_cpu = med(dag, "total_s"), med(dag, "total_cpu")
    added_wall, added_cpu = total_wall - sdk_wall, total_cpu - sdk_cpu
    file_wall, file_cpu = med(dag, "dag_file_s"), med(dag, "dag_file_cpu")
    last = dag[-1]
    n = max(1, args.specs)

    print(f"specs generated:                       {args.specs} ({last['dags']} DAGs, {last['tasks']} tasks)")
    print(
        f"repetitions (fresh processes):         {args.repeat}, medians; CPU time of the process, wall in ()"
    )
    print(f"import airflow.sdk alone:              {sdk_cpu:.3f} s  ({sdk_wall:.3f} s)")
    print(
        f"import airflow.sdk + the DAG file:     {total_cpu:.3f} s  ({total_wall:.3f} s), "
        f"ratio {total_cpu / sdk_cpu:.2f}x"
    )
    print(
        f"added by the DAG file (end to end):    {added_cpu:.3f} s  ({added_wall:.3f} s), target <= {TARGET_ADDED_S} s"
    )
    print(
        f"DAG file alone after airflow.sdk:      {file_cpu:.3f} s  ({file_wall:.3f} s), "
        f"{1000 * file_cpu / n:.1f} ms per spec"
    )
    print(f"heavy modules imported:                {last['heavy'] or 'none'}")
    print(f"SQLAlchemy engines created:            {len(last['engines'])}")
    print(f"sockets connected:                     {len(last['connects'])}")
    print(f"new top-level modules:                 {', '.join(last['new_top_level_modules'])}")

    failures = []
    if last["dags"] != args.specs or last["broken"]:
        failures.append(f"expected {args.specs} valid DAGs, got {last['dags']} (broken: {last['broken']})")
    if added_cpu > TARGET_ADDED_S:
        failures.append(f"the DAG file adds {added_cpu:.3f} s of CPU time > {TARGET_ADDED_S} s")
    if any(r["heavy"] for r in dag):
        failures.append(f"heavy modules at parse time: {sorted({m for r in dag for m in r['heavy']})}")
    if any(r["engines"] for r in dag):
        failures.append(f"database engines created at parse time: {last['engines']}")
    if any(r["connects"] for r in dag):
        failures.append(f"network connections at parse time: {last['connects']}")
    print("RESULT: " + ("PASS" if not failures else "FAIL\n  - " + "\n  - ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
