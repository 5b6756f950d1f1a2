"""``python -m airflow_local`` (``make airflow``): Airflow standalone with the gateway and simulated traffic.

Sets up ``var/airflow`` (the same state folder as the demo), trains the demo models when they are missing,
starts the real model gateway on 127.0.0.1 with a random admin token and the SQLite prediction log, starts
the traffic simulator (with label feedback) as a child process, and runs ``airflow standalone`` bound to
127.0.0.1. The connections ``canary_gateway`` and ``canary_prediction_log`` are given to Airflow as
``AIRFLOW_CONN_*`` environment variables, so the token is never written to disk.

By default the DAGs are built from demo copies of ``include/rollouts/*.yaml`` with holds of seconds
(``var/demo/rollouts``) so a rollout triggered from the UI finishes in a few minutes; ``--real-specs``
uses ``include/rollouts`` as they are. Ctrl-C stops Airflow, the simulator and the gateway (in that order).
See docs/demo.md for triggering a rollout from the UI form.

Your own model (docs/own-model.md): ``--model-dir`` (registered with ``python -m gateway.register``; the demo
models are then not trained), ``--rollouts-dir`` (your specs; demo copies with short holds unless
``--real-specs``), ``--expectations-dir`` (your data-quality suites), ``--model`` and ``--csv`` (the simulator
replays your rows; ``--label-column``, ``--unit-column``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from canary_demo.scenario import write_demo_specs
from canary_demo.stack import REPO, DemoError, StackPaths, airflow_env, new_token, start_gateway


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m airflow_local", description=__doc__.split("\n\n")[0])
    p.add_argument("--var-dir", default=str(REPO / "var"), help="state folder (default: <repo>/var)")
    p.add_argument("--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", 8808)))
    p.add_argument("--airflow-port", type=int, default=int(os.environ.get("AIRFLOW_PORT", 8080)))
    p.add_argument("--model", default=os.environ.get("SIMULATOR_MODEL", "fraud"), help="model the simulator calls")
    p.add_argument("--rate", type=float, default=float(os.environ.get("RATE", 20)), help="requests per second")
    p.add_argument("--real-specs", action="store_true", help="use the specs as they are (their real holds)")
    p.add_argument("--model-dir", help="your model directory (default: <var-dir>/models with the demo models)")
    p.add_argument("--rollouts-dir", help="folder of your rollout specs (default: include/rollouts)")
    p.add_argument("--expectations-dir", help="folder of your data-quality suites (default: include/expectations)")
    p.add_argument("--csv", help="the simulator replays this CSV's rows for --model (docs/own-model.md)")
    p.add_argument("--label-column", help="CSV column posted as the label (feedback)")
    p.add_argument("--unit-column", help="CSV column of the unit id (sticky routing)")
    args = p.parse_args(argv)
    for name in ("model_dir", "rollouts_dir", "expectations_dir", "csv"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            p.error(f"--{name.replace('_', '-')} {value}: no such file or folder; give an existing path")
    if (args.label_column or args.unit_column) and not args.csv:
        p.error("--label-column/--unit-column need --csv (the demo models' traffic has its own labels)")
    return args


def _stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``; from ``/proc`` where there is one."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _stop_group(proc: subprocess.Popen | None, timeout: float = 60) -> None:
    """Stop ``airflow standalone`` and every process it started (it runs in its own process group):
    SIGINT like Ctrl-C, then SIGTERM, then SIGKILL for whatever is left. It waits for the whole group, not
    just the leader: the scheduler or triggerer can outlive ``standalone`` by seconds, and a process left
    behind keeps its LocalExecutor workers and the metadata database busy."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 15.0)):
        if not _group_members(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so it does not count as alive
            if not _group_members(proc.pid):
                break
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    paths = StackPaths(Path(args.var_dir).resolve(),
                       model_dir=Path(args.model_dir).resolve() if args.model_dir else None)
    paths.make()
    token = new_token()
    env = airflow_env(paths, gateway_port=args.gateway_port, token=token)
    env.update({
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(args.airflow_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{args.airflow_port}",
        # task processes reach the API server here (the default, localhost:8080, breaks on another port)
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{args.airflow_port}/execution/",
        # airflow standalone starts its parts as `airflow <command>`: the venv's bin must be on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    source_specs = Path(args.rollouts_dir).resolve() if args.rollouts_dir else None
    if not args.real_specs:
        spec_dir = paths.var / "demo" / "rollouts"
        if spec_dir.is_dir():  # copies of specs removed from the source folder must not linger as DAGs
            for old in spec_dir.glob("*.yaml"):
                old.unlink()
        write_demo_specs(spec_dir, source_dir=source_specs)
        env["CANARY_ROLLOUTS_DIR"] = str(spec_dir)
    elif source_specs is not None:
        env["CANARY_ROLLOUTS_DIR"] = str(source_specs)
    if args.expectations_dir:
        env["CANARY_EXPECTATIONS_DIR"] = str(Path(args.expectations_dir).resolve())
    os.environ.update(env)

    # DAGs first created by `python -m canary_demo` (dag.test) are paused; a UI user expects them on.
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "airflow", "dags", "unpause", "--treat-dag-id-as-regex", "-y",
                    "^canary_rollout__"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if args.model_dir is None and not (paths.models / args.model).is_dir():
        print(f"training the demo models into {paths.models} ...", flush=True)
        subprocess.run([sys.executable, "-m", "demo_models.train", "--out", str(paths.models)], env=env, check=True)

    def _terminate(signum, frame):  # SIGTERM (e.g. from a process manager): clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    gateway = simulator = airflow = None
    try:
        gateway = start_gateway(paths, token, args.gateway_port)
        print(f"gateway: {gateway.url} (log {gateway.log_path})", flush=True)
        sim_log = open(paths.logs / "simulator.log", "ab")  # noqa: SIM115 (lives as long as the child)
        replay = [] if not args.csv else ["--csv", str(Path(args.csv).resolve())] + [
            arg for flag, value in (("--label-column", args.label_column), ("--unit-column", args.unit_column))
            if value for arg in (flag, value)]
        simulator = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--url", gateway.url, "--model", args.model,
             "--rate", str(args.rate), "--duration", str(7 * 24 * 3600), *replay],
            env=env, stdout=sim_log, stderr=subprocess.STDOUT,
        )
        print(f"simulator: {args.rate:g} requests/s to {args.model} (log {paths.logs / 'simulator.log'})", flush=True)
        print(f"airflow: http://127.0.0.1:{args.airflow_port} (AIRFLOW_HOME {paths.airflow_home}; the admin "
              "password is printed below and stored in simple_auth_manager_passwords.json.generated there)",
              flush=True)
        airflow = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, start_new_session=True)
        return airflow.wait()
    except DemoError as exc:
        print(f"airflow_local: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_group(airflow)
        _stop(simulator)
        if gateway is not None:
            gateway.stop()


if __name__ == "__main__":
    raise SystemExit(main())
