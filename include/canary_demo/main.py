"""The main job: set up the local stack and run the demo's rollouts end to end (``python -m canary_demo``).

Steps (each prints one line; the full output of every part goes to ``var/logs``):

1. fresh state: the previous prediction log and model directory are removed (a rerun starts from v1);
2. ``airflow db migrate`` of ``var/airflow`` and the demo models trained into ``var/models`` (in parallel);
3. the demo spec (holds of seconds) written to ``var/demo/rollouts`` and given to the DAG factory through
   ``CANARY_ROLLOUTS_DIR``; the connections are ``AIRFLOW_CONN_*`` environment variables;
4. the real gateway on 127.0.0.1 with a random admin token and the SQLite log ``var/predictions.db``;
5. simulated traffic with label feedback in a background thread, and a warm-up so the pre-flight has
   stable traffic to plan from;
6. the rollouts of :data:`canary_demo.scenario.CASES` with ``dag.test()``, one after the other;
7. a summary: decisions, reasons, final route, where the reports are. Exit code 0 only when every rollout
   ended as expected.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from canary_demo.scenario import CASES, MODEL, STABLE, RolloutCase, write_demo_spec
from canary_demo.stack import (
    REPO,
    DemoError,
    StackPaths,
    airflow_env,
    free_port,
    new_token,
    start_gateway,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m canary_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--var-dir", default=str(REPO / "var"), help="state folder (default: <repo>/var)")
    p.add_argument("--port", type=int, default=0, help="gateway port on 127.0.0.1 (default: a free one)")
    p.add_argument("--rate", type=float, default=60.0, help="simulated requests per second (default 60)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of stable-only traffic first (default 20)")
    p.add_argument("--only", choices=[c.expect for c in CASES], help="run only the case with this outcome")
    return p.parse_args(argv)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)


def _fresh_state(paths: StackPaths) -> None:
    """Remove the previous prediction log (with its stored routes) and models: every run starts at v1."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{paths.prediction_db}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(paths.models, ignore_errors=True)
    paths.make()


def _setup_airflow_and_models(paths: StackPaths, env: dict[str, str]) -> None:
    """``airflow db migrate`` and model training in two child processes at once."""
    log = paths.logs / "setup.log"
    with open(log, "ab") as out:
        migrate = subprocess.Popen([sys.executable, "-m", "airflow", "db", "migrate"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
        train = subprocess.Popen([sys.executable, "-m", "demo_models.train", "--out", str(paths.models)], env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        codes = {"airflow db migrate": migrate.wait(600), "demo model training": train.wait(600)}
    failed = [f"{name} (exit code {code})" for name, code in codes.items() if code != 0]
    if failed:
        raise DemoError(f"{' and '.join(failed)} failed; see {log}")
    if not (paths.models / MODEL / STABLE / "metadata.json").exists():
        raise DemoError(f"demo model training wrote no {MODEL}/{STABLE} into {paths.models}; see {log}")
    from canary_demo.candidate import register_good_candidate

    register_good_candidate(paths.models)


def _route_getter(url: str):
    import requests

    session = requests.Session()

    def get_route() -> dict[str, Any]:
        response = session.get(f"{url}/v1/models/{MODEL}/route", timeout=5)
        response.raise_for_status()
        return response.json()

    return get_route


def _print_result(result, index: int) -> None:
    print(f"\n  Rollout {index}: {result.case.candidate} ({result.case.title})")
    print(f"    expected: {result.case.expect.replace('_', ' ')}; got: {result.outcome.replace('_', ' ')} "
          f"(DAG run {result.state}, {result.seconds:.0f} s, run id {result.run_id})")
    if result.steps:
        print("    traffic steps: " + " -> ".join(f"{p:g} %" for p in result.steps))
    for look in result.looks:
        took = f"{look.count} look{'s' if look.count != 1 else ''}" + (
            f", {look.seconds:.0f} s" if look.seconds is not None else "")
        print(f"    step {look.step} ({took}): {str(look.decision).upper()}: {look.reason}")
    if result.outcome == "rolled_back":
        print(f"    rollback reason: {result.reason}")
    route = result.route
    canary = f", canary {route.get('canary')} at {route.get('canary_percent'):g} %" if route.get("canary") else ""
    print(f"    route after the run: stable {route.get('stable')}{canary} (generation {route.get('generation')})")
    print(f"    notifications received by the webhook: {', '.join(result.notifications or []) or 'none'}")
    print(f"    report: {result.report_path or '(none)'}")
    print(f"    full log: {result.log_path}")
    if result.problems:
        for problem in result.problems:
            print(f"    PROBLEM: {problem}")
        failed = sorted(t for t, s in result.task_states.items() if s == "failed")
        if failed:
            print(f"    failed tasks: {', '.join(failed)}")
        for line in result.errors:
            print(f"    error: {line}")


def run_demo(args: argparse.Namespace) -> int:
    clock = _Clock()
    paths = StackPaths(Path(args.var_dir).resolve())
    paths.make()
    token = new_token()
    port = args.port or free_port()
    spec_dir = paths.var / "demo" / "rollouts"
    from canary_demo.webhook import WebhookReceiver

    receiver = WebhookReceiver(new_token()).start()
    env = airflow_env(paths, gateway_port=port, token=token, webhook_conn=receiver.connection())
    env["CANARY_ROLLOUTS_DIR"] = str(spec_dir)
    os.environ.update(env)  # before Airflow is imported anywhere in this process

    clock.say(f"state folder {paths.var}; logs in {paths.logs}; notifications go to a webhook on "
              f"127.0.0.1:{receiver.port}")
    _fresh_state(paths)
    clock.say("migrating the Airflow DB (var/airflow) and training the demo models and the good candidate "
              "fraud/v5 (var/models) ...")
    _setup_airflow_and_models(paths, env)
    spec_path = write_demo_spec(spec_dir, webhook_conn_id="canary_webhook")
    clock.say(f"demo spec (holds of seconds) written to {spec_path}")

    gateway = start_gateway(paths, token, port)
    clock.say(f"gateway up at {gateway.url} (prediction log {paths.prediction_db}; log {gateway.log_path})")
    get_route = _route_getter(gateway.url)
    traffic = None
    results = []
    try:
        from canary_demo.traffic import Traffic

        traffic = Traffic(gateway.url, MODEL, rate=args.rate, log_path=paths.logs / "simulator.log")
        traffic.start()
        clock.say(f"simulated traffic at {args.rate:g} requests/s with label feedback; warming up "
                  f"{args.warmup:g} s on stable {STABLE} ...")
        traffic.wait_for_predictions(paths.prediction_db, minimum=int(args.warmup * args.rate * 0.5),
                                     timeout=args.warmup * 4 + 30, at_least_seconds=args.warmup)

        from canary_demo.runs import check, run_case

        cases: list[RolloutCase] = [c for c in CASES if args.only in (None, c.expect)]
        dag_id = f"canary_rollout__{MODEL}"
        for i, case in enumerate(cases, start=1):
            stable_before = get_route()["stable"]
            clock.say(f"rollout {i}/{len(cases)}: {case.candidate} against stable {stable_before} "
                      f"(expected: {case.expect.replace('_', ' ')}); conf {case.conf()}")
            result = run_case(case, dag_id, get_route, paths.logs / f"rollout-{i}-{case.candidate}.log")
            result.notifications = receiver.events_for(result.run_id)
            result.problems = check(result, stable_before)
            clock.say(f"rollout {i} ended {result.state} after {result.seconds:.0f} s: {result.outcome}"
                      + ("" if result.ok else " (NOT AS EXPECTED)"))
            results.append(result)
    finally:
        if traffic is not None:
            traffic.stop()
        gateway.stop()
        receiver.stop()

    print("\n=== Summary " + "=" * 60)
    for i, result in enumerate(results, start=1):
        _print_result(result, i)
    final = results[-1].route if results else {}
    print(f"\n  Final route of {MODEL}: stable {final.get('stable')}, canary share {final.get('canary_percent')} %")
    print(f"  Reports: {paths.reports}")
    ok = bool(results) and all(r.ok for r in results) and len(results) == len(
        [c for c in CASES if args.only in (None, c.expect)])
    print(f"  Result: {'every rollout ended as expected' if ok else 'NOT every rollout ended as expected'} "
          f"({time.monotonic() - clock.t0:.0f} s in total)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m canary_demo``; returns the exit code."""
    args = _parse(argv)
    try:
        return run_demo(args)
    except DemoError as exc:
        print(f"\ncanary_demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncanary_demo: interrupted", file=sys.stderr)
        return 130
