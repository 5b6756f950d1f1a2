"""Command line: `python -m gateway --model-dir DIR --db-url URL --host 127.0.0.1 --port N`.

The admin token is read from the environment variable CANARY_GATEWAY_TOKEN and never printed. Without it the
gateway refuses to start, unless `--insecure-no-token` is given for a local experiment. SIGTERM/SIGINT stop it
gracefully: in-flight requests finish and every accepted prediction row is written before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

TOKEN_ENV = "CANARY_GATEWAY_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path, help="model directory <model>/<version>/")
    parser.add_argument("--db-url", required=True, help="SQLAlchemy URL of the prediction log")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8808, help="port to bind (default 8808)")
    parser.add_argument("--insecure-no-token", action="store_true", help="allow admin calls without a token")
    parser.add_argument("--no-log", action="store_true", help="do not write predictions (benchmark baseline)")
    parser.add_argument(
        "--lease-check-interval", type=float, default=0.25, help="seconds between lease checks"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="most rows per log transaction")
    parser.add_argument(
        "--inline-threshold-ms", type=float, default=1.0, help="models faster than this run on the event loop"
    )
    parser.add_argument("--model-threads", type=int, default=1, help="OpenMP/BLAS threads per model call")
    parser.add_argument("--flush-interval", type=float, default=0.05, help="longest wait before a partial batch")
    parser.add_argument(
        "--max-queue", type=int, default=50_000, help="log queue bound (back-pressure beyond)"
    )
    parser.add_argument(
        "--spill-path", type=Path, default=None, help="file for rows the DB refuses at shutdown"
    )
    parser.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to finish requests on stop"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the options, build the app and serve it with uvicorn until SIGTERM/SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not args.insecure_no_token:
        print(
            f"error: the admin token is missing: set {TOKEN_ENV} in the environment (or pass --insecure-no-token "
            "for a local experiment only)",
            file=sys.stderr,
        )
        return 2
    if not args.model_dir.is_dir():
        print(
            f"error: --model-dir {args.model_dir} is not a directory; run `make models` first",
            file=sys.stderr,
        )
        return 2
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} must be between 1 and 65535", file=sys.stderr)
        return 2

    # One BLAS/OpenMP thread per model call: the gateway predicts single rows from many threads, where OpenMP
    # thread teams only add spin-waiting (gradient-boosted trees were 10x slower on a busy 2-core machine).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.model_threads))

    # Hand the GIL over sooner (default 5 ms): the log writer and slow models run in threads, and the event loop
    # should not wait a full default interval for the GIL behind them.
    sys.setswitchinterval(0.0005)

    import uvicorn

    from gateway.app import create_app
    from gateway.service import GatewayConfig

    config = GatewayConfig(
        model_dir=args.model_dir,
        db_url=args.db_url,
        admin_token=token,
        log_predictions=not args.no_log,
        lease_check_interval=args.lease_check_interval,
        batch_size=args.batch_size,
        max_queue=args.max_queue,
        flush_interval=args.flush_interval,
        inline_threshold_ms=args.inline_threshold_ms,
        spill_path=args.spill_path,
    )
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
