"""Command line: `python -m simulator --url URL --model M --rate R --duration S [--units N --label-delay S --seed K]`.

Sends `rate` requests per second for `duration` seconds to the gateway (loopback only), posts each answer's true
label after `label-delay` seconds, and prints what it sent as JSON. Ctrl-C stops it early (pending labels dropped).
With `--csv FILE [--label-column y] [--unit-column user_id]` the requests are the rows of your own CSV (any
registered model; rows in order, looping) and the label column is posted as feedback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the simulation, print the summary."""
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8808")
    parser.add_argument("--model", required=True, help="model name: fraud or eta, or any registered model with --csv")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds to send for")
    parser.add_argument("--units", type=int, default=1000, help="size of the unit population (default 1000)")
    parser.add_argument("--label-delay", type=float, default=5.0, help="seconds before the label is posted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the population and request stream")
    parser.add_argument("--feedback-share", type=float, default=1.0, help="share of answers that get a label")
    parser.add_argument("--workers", type=int, default=4, help="concurrent connections (default 4)")
    parser.add_argument("--csv", help="replay the rows of this CSV (columns named like the model's features)")
    parser.add_argument("--label-column", help="CSV column with the true label, posted as feedback")
    parser.add_argument("--unit-column", help="CSV column with the unit id (default: a hash of the row index)")
    args = parser.parse_args(argv)

    from simulator.traffic import Simulation, SimulationConfig

    try:
        config = SimulationConfig(
            url=args.url, model=args.model, rate=args.rate, duration=args.duration, units=args.units,
            label_delay=args.label_delay, seed=args.seed, feedback_share=args.feedback_share, workers=args.workers,
            csv=args.csv, label_column=args.label_column, unit_column=args.unit_column,
        )
        simulation = Simulation(config, threading.Event())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, lambda *_: simulation.stop_event.set())
    signal.signal(signal.SIGTERM, lambda *_: simulation.stop_event.set())
    source = (f"csv={config.csv} ({simulation.replay.rows} rows)" if simulation.replay is not None
              else f"units={config.units}")
    print(f"simulator: {config.rate:g} req/s for {config.duration:g}s to {config.url} model={config.model} "
          f"{source} label_delay={config.label_delay:g}s", file=sys.stderr)
    summary = simulation.run()
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if summary["answered"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
