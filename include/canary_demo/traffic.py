"""Simulated traffic for the demo: the project's simulator in a background thread, with label feedback."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from canary_demo.stack import DemoError


class Traffic:
    """Runs ``simulator.run(...)`` in a daemon thread until :meth:`stop`.

    :param url: the gateway's base URL.
    :param model: the model to send requests to.
    :param rate: requests per second.
    :param log_path: file for the simulator's log lines.
    :param label_delay: seconds until a request's true label is sent back as feedback.
    :param units: distinct unit ids (sticky routing keys) the traffic comes from.
    :param seed: the simulator's random seed.
    """

    def __init__(self, url: str, model: str, *, rate: float, log_path: Path, label_delay: float = 2.0,
                 units: int = 2000, seed: int = 0) -> None:
        self.url = url
        self.model = model
        self.rate = rate
        self.log_path = log_path
        self.label_delay = label_delay
        self.units = units
        self.seed = seed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Any = None
        self.started_at = 0.0

    def start(self) -> None:
        try:
            import simulator
        except ImportError as exc:
            raise DemoError(f"the traffic simulator (include/simulator) cannot be imported: {exc}") from None
        if not hasattr(simulator, "run"):
            raise DemoError("include/simulator has no run() yet: the simulator has not landed")
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        sim_log = logging.getLogger("simulator")
        sim_log.addHandler(handler)
        sim_log.propagate = False

        def body() -> None:
            try:
                self._result = simulator.run(
                    self.url, self.model, rate=self.rate, duration=24 * 3600, units=self.units,
                    label_delay=self.label_delay, seed=self.seed, stop_event=self._stop, flush_feedback=False,
                )
            except BaseException as exc:  # reported by check() and stop()
                self._error = exc

        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=body, name="simulator", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`DemoError` when the simulator thread died."""
        if self._error is not None:
            raise DemoError(f"the traffic simulator stopped with {type(self._error).__name__}: {self._error}; "
                            f"see {self.log_path}")
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise DemoError(f"the traffic simulator ended early; see {self.log_path}")

    def wait_for_predictions(self, db: Path, *, minimum: int, timeout: float, at_least_seconds: float = 0) -> int:
        """Wait until the prediction log holds ``minimum`` rows of the model (and ``at_least_seconds``
        have passed); returns the count. Reads the SQLite file read-only."""
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            self.check()
            count = _count(db, self.model)
            if count >= minimum and time.monotonic() - self.started_at >= at_least_seconds:
                return count
            time.sleep(1.0)
        raise DemoError(f"only {count} predictions of {self.model} were logged in {timeout:.0f} s "
                        f"(needed {minimum}); see {self.log_path}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def _count(db: Path, model: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM predictions WHERE model = ?", (model,)).fetchone()[0])
    except sqlite3.Error:
        return 0
