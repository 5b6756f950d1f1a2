"""Gateway overhead: the model called in-process versus through the gateway (routing + logging) on loopback.

    PYTHONPATH=include:plugins .venv/bin/python benchmarks/gateway_overhead.py [--rate 500 --duration 20]

One run measures, on the same machine and the same model (fraud v1):

1. in-process: `LoadedModel.predict` called directly (the baseline every other figure is compared with);
2. the gateway with logging at a sustained `--rate` (open loop: requests are sent on a fixed schedule, not when
   the previous one returns): added latency p50/p99 = gateway round trip minus in-process call, errors, and lost
   rows (answered request ids missing from the log after a graceful stop);
3. the same at the same rate with `--no-log`;
4. saturation throughput (closed loop, `--concurrency` connections) with and without logging, and their ratio.

Targets (issue 3): added p50 <= 1 ms, p99 <= 5 ms, zero errors, zero lost rows, throughput with logging >= 0.8x.
The load generator is asyncio + aiohttp with keep-alive connections in this process; it shares the CPU with the
gateway, so on a busy machine the figures include that contention (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "include"), str(REPO / "plugins")]

from demo_models.data import Population  # noqa: E402
from demo_models.train import train_all  # noqa: E402
from gateway.registry import ModelRegistry  # noqa: E402
from gateway.testing import start_gateway  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402


@dataclass
class Phase:
    """Figures of one measured phase."""

    name: str
    requests: int
    ok: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost_rows: int | None = None


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process(model_dir: Path, bodies: list[dict], rounds: int) -> Phase:
    """The model called directly through the gateway's own adapter (feature row + predict)."""
    loaded = ModelRegistry(model_dir)
    loaded.scan()
    model = loaded.load("fraud", "v1")
    latencies = []
    started = time.perf_counter()
    for i in range(rounds):
        features = bodies[i % len(bodies)]["features"]
        t0 = time.perf_counter()
        model.predict(model.row(features))
        latencies.append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    return Phase("in-process model call", rounds, rounds, 0, seconds, rounds / seconds,
                 _pct(latencies, 50), _pct(latencies, 99), max(latencies))


async def _open_loop(url: str, bodies: list[dict], rate: float, duration: float, warmup: float) -> tuple:
    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0
    lag: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int, measured: bool) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=bodies[i % len(bodies)]) as response:
                    payload = await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status, payload = 0, b""
            elapsed = (time.perf_counter() - t0) * 1000
            if not measured:
                return
            if status == 200:
                latencies.append(elapsed)
                ids.append(json.loads(payload)["request_id"])
            else:
                errors += 1

        total_warm = int(rate * warmup)
        total = int(rate * duration)
        tasks = []
        start = time.perf_counter()
        for i in range(total_warm + total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag.append(-delay * 1000)
            if i == total_warm:
                measured_start = time.perf_counter()
            tasks.append(asyncio.create_task(one(i, i >= total_warm)))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - measured_start
    return latencies, ids, errors, seconds, (max(lag) if lag else 0.0)


async def _closed_loop(url: str, bodies: list[dict], concurrency: int, duration: float) -> tuple[int, int, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    done = errors = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.perf_counter() + duration

        async def client(k: int) -> None:
            nonlocal done, errors
            i = k
            while time.perf_counter() < stop:
                async with session.post(url, json=bodies[i % len(bodies)]) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        errors += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        seconds = time.perf_counter() - started
    return done, errors, seconds


def _count_logged(db_url: str, ids: list[str]) -> int:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMPORARY TABLE answered (request_id TEXT PRIMARY KEY)"))
        conn.execute(text("INSERT INTO answered VALUES (:r)"), [{"r": r} for r in ids])
        found = conn.execute(
            text("SELECT COUNT(*) FROM predictions p JOIN answered a ON a.request_id = p.request_id")
        ).scalar_one()
    engine.dispose()
    return int(found)


def gateway_phases(model_dir: Path, db_url: str, bodies: list[dict], args: argparse.Namespace,
                   log_rows: bool) -> tuple[Phase, Phase]:
    """Sustained-rate phase (latency, errors, lost rows) and saturation phase on one gateway process."""
    extra = [] if log_rows else ["--no-log"]
    gw = start_gateway(model_dir, db_url, extra_args=extra)
    try:
        url = f"{gw.url}/v1/models/fraud/predict"
        latencies, ids, errors, seconds, lag = asyncio.run(
            _open_loop(url, bodies, args.rate, args.duration, args.warmup)
        )
        label = "with logging" if log_rows else "without logging"
        sustained = Phase(f"gateway {label} @ {args.rate:g}/s", len(latencies) + errors, len(latencies), errors,
                          seconds, len(latencies) / seconds, _pct(latencies, 50), _pct(latencies, 99),
                          max(latencies) if latencies else float("nan"))
        if lag > 50:
            print(f"  note: the load generator fell behind its schedule by up to {lag:.0f} ms", file=sys.stderr)
        done, sat_errors, sat_seconds = asyncio.run(_closed_loop(url, bodies, args.concurrency, args.saturation))
        saturation = Phase(f"gateway {label}, saturation x{args.concurrency}", done + sat_errors, done, sat_errors,
                           sat_seconds, done / sat_seconds, float("nan"), float("nan"), float("nan"))
    finally:
        gw.stop()
    if log_rows:
        sustained.lost_rows = len(ids) - _count_logged(db_url, ids)
    return sustained, saturation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="sustained request rate (default 500/s)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds at the rate (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--saturation", type=float, default=5.0, help="seconds of closed-loop load (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop connections (default 16)")
    parser.add_argument("--db-url", default=None, help="log database (default: a fresh SQLite file)")
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: train demo models)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    model_dir = args.model_dir or work / "models"
    if args.model_dir is None:
        train_all(model_dir, rows=20_000, log=lambda _m: None)
    batch = Population("fraud", 5000, seed=1).draw(np.random.default_rng(1), 5000)
    bodies = [{"unit_id": f"unit-{u}", "features": f} for u, f in zip(batch.units.tolist(), batch.records(),
                                                                       strict=True)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    base = in_process(model_dir, bodies, 5000)
    logged_db = args.db_url or f"sqlite:///{work / 'predictions.db'}"
    with_log, sat_log = gateway_phases(model_dir, logged_db, bodies, args, log_rows=True)
    nolog_db = f"sqlite:///{work / 'unused.db'}"
    without_log, sat_nolog = gateway_phases(model_dir, nolog_db, bodies, args, log_rows=False)

    added_p50 = with_log.p50_ms - base.p50_ms
    added_p99 = with_log.p99_ms - base.p99_ms
    ratio = sat_log.throughput / sat_nolog.throughput
    rate_ok = with_log.throughput >= 0.98 * args.rate
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"{'phase':46s} {'ok':>7s} {'err':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} lost")
    for phase in (base, with_log, without_log, sat_log, sat_nolog):
        lost = "" if phase.lost_rows is None else str(phase.lost_rows)
        print(f"{phase.name:46s} {phase.ok:7d} {phase.errors:4d} {phase.throughput:8.1f} {phase.p50_ms:8.3f} "
              f"{phase.p99_ms:8.3f} {phase.max_ms:8.2f} {lost}")
    checks = {
        "added latency p50 <= 1 ms": (added_p50, added_p50 <= 1.0),
        "added latency p99 <= 5 ms": (added_p99, added_p99 <= 5.0),
        "errors == 0": (with_log.errors + sat_log.errors, with_log.errors + sat_log.errors == 0),
        "lost rows == 0": (with_log.lost_rows, with_log.lost_rows == 0),
        f"sustained {args.rate:g}/s with logging": (with_log.throughput, rate_ok),
        "throughput with/without logging >= 0.8": (ratio, ratio >= 0.8),
    }
    print()
    for name, (value, ok) in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name:42s} {value:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "phases": [asdict(p) for p in (base, with_log, without_log, sat_log, sat_nolog)],
            "added_p50_ms": added_p50, "added_p99_ms": added_p99, "throughput_ratio": ratio,
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
        }, indent=2))
    return 0 if all(ok for _, ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
