"""Send predict requests at a fixed rate from a population of units, then post the true labels as feedback.

Features and labels come from `demo_models.data` (the process the demo models were trained on), so the feedback
is the true label of each request and label metrics (mistake rate, absolute error) are real. With `csv` set
(replay mode, `simulator.replay`), the requests are the rows of your own CSV file instead, for any registered
model, and the label column is posted as feedback. Only loopback URLs are accepted. The run is bounded by
`duration` (and `stop_event`) and returns a summary of what it sent.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
from demo_models.data import Population

log = logging.getLogger("simulator")

MAX_RATE = 5000.0
MAX_DURATION = 7 * 24 * 3600.0


def check_loopback(url: str) -> str:
    """Return `url` without a trailing slash when it points at a loopback address; raise ValueError otherwise."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"url={url!r}: give the gateway's base URL, e.g. http://127.0.0.1:8808")
    host = parsed.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"url={url!r}: the simulator only sends traffic to loopback (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


@dataclass
class SimulationConfig:
    """One simulation run.

    :param url: gateway base URL (loopback only).
    :param model: model name (`fraud` or `eta`: the processes `demo_models.data` knows; any registered model
        with `csv`).
    :param rate: requests per second (0 < rate <= 5000).
    :param duration: seconds to send for.
    :param units: size of the unit population (unit ids `unit-<i>`).
    :param label_delay: seconds between an answer and its feedback (the true label).
    :param seed: seed of the population and of the request stream.
    :param feedback_share: share of answered requests that get feedback (0..1).
    :param workers: concurrent HTTP connections (each a `requests.Session` with keep-alive).
    :param timeout: seconds per HTTP call.
    :param flush_feedback: at the end, wait until the pending labels are due and post them.
    :param csv: replay mode: send the rows of this CSV file in order (looping) instead of demo data.
    :param label_column: replay mode: the column with the true label, posted as feedback (None: no feedback).
    :param unit_column: replay mode: the column with the unit id (None: a stable hash of the row index).
    """

    url: str
    model: str
    rate: float
    duration: float
    units: int = 1000
    label_delay: float = 5.0
    seed: int = 0
    feedback_share: float = 1.0
    workers: int = 4
    timeout: float = 10.0
    flush_feedback: bool = True
    csv: str | Path | None = None
    label_column: str | None = None
    unit_column: str | None = None

    def __post_init__(self) -> None:
        self.url = check_loopback(self.url)
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate={self.rate}: must be > 0 and <= {MAX_RATE:g} requests per second")
        if not 0 < self.duration <= MAX_DURATION:
            raise ValueError(f"duration={self.duration}: must be > 0 and at most a week (seconds)")
        if self.units < 1:
            raise ValueError(f"units={self.units}: need at least one unit")
        if self.label_delay < 0:
            raise ValueError(f"label_delay={self.label_delay}: must be >= 0 seconds")
        if not 0 <= self.feedback_share <= 1:
            raise ValueError(f"feedback_share={self.feedback_share}: must be between 0 and 1")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers={self.workers}: must be between 1 and 64")
        if self.csv is None and (self.label_column is not None or self.unit_column is not None):
            raise ValueError(
                f"label_column={self.label_column!r} unit_column={self.unit_column!r}: these columns belong to a "
                "CSV replay; also pass --csv FILE"
            )
        if self.csv is not None and not Path(self.csv).is_file():
            raise ValueError(f"csv={str(self.csv)!r}: no such file; pass the CSV to replay")


@dataclass
class _Tally:
    """Counters shared by the worker threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    answered: int = 0
    status: Counter = field(default_factory=Counter)
    arms: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    connection_errors: int = 0
    feedback_posted: int = 0
    feedback_failed: int = 0
    feedback_dropped: int = 0
    last_error: str | None = None


class Simulation:
    """A running simulation: a paced dispatcher, HTTP workers and a feedback poster."""

    def __init__(self, config: SimulationConfig, stop_event: threading.Event | None = None) -> None:
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.replay = None
        self.population = None
        if config.csv is not None:
            from simulator.replay import CsvReplay, model_features

            features = model_features(config.url, config.model, timeout=config.timeout)
            self.replay = CsvReplay(config.csv, features, config.label_column, config.unit_column)
        else:
            try:
                self.population = Population(config.model, config.units, seed=config.seed)
            except ValueError as exc:
                raise ValueError(f"{exc}; for your own model replay a CSV of its requests with --csv FILE "
                                 "(see docs/own-model.md)") from exc
        self._rng = np.random.default_rng([config.seed, 101])
        self._jobs: queue.Queue = queue.Queue(maxsize=max(8, config.workers * 4))
        self._labels: list[tuple[float, int, str, float]] = []
        self._labels_lock = threading.Condition()
        self._tally = _Tally()
        self._sending_done = threading.Event()

    # -- requests ----------------------------------------------------------------------------------------------
    def _requests(self) -> Any:
        if self.replay is not None:
            yield from self.replay.jobs(self._rng, self.config.feedback_share)
            return
        while True:
            batch = self.population.draw(self._rng, 256)
            feedback = self._rng.random(256) < self.config.feedback_share
            for unit, features, label, wants in zip(
                batch.units.tolist(), batch.records(), batch.labels.tolist(), feedback.tolist(), strict=True
            ):
                yield {"unit_id": f"unit-{unit}", "features": features}, float(label), wants

    def _worker(self) -> None:
        session = requests.Session()
        url = f"{self.config.url}/v1/models/{self.config.model}/predict"
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                body, label, wants_feedback = job
                try:
                    response = session.post(url, json=body, timeout=self.config.timeout)
                except requests.RequestException as exc:
                    with self._tally.lock:
                        self._tally.connection_errors += 1
                        self._tally.last_error = repr(exc)
                    continue
                with self._tally.lock:
                    self._tally.answered += 1
                    self._tally.status[str(response.status_code)] += 1
                    if response.status_code == 200:
                        answer = response.json()
                        self._tally.arms[answer.get("arm", "?")] += 1
                        self._tally.versions[answer.get("version", "?")] += 1
                    elif response.status_code != 500:
                        self._tally.last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code == 200 and wants_feedback:
                    due = time.monotonic() + self.config.label_delay
                    with self._labels_lock:
                        heapq.heappush(self._labels, (due, id(job), answer["request_id"], label))
                        self._labels_lock.notify()
        finally:
            session.close()

    # -- feedback ----------------------------------------------------------------------------------------------
    def _feedback_poster(self) -> None:
        session = requests.Session()
        url = f"{self.config.url}/v1/models/{self.config.model}/feedback"
        try:
            while True:
                with self._labels_lock:
                    while True:
                        if self.stop_event.is_set():
                            self._tally.feedback_dropped += len(self._labels)
                            self._labels.clear()
                            return
                        if not self._labels and self._sending_done.is_set():
                            return
                        if self._labels and self._labels[0][0] <= time.monotonic():
                            _, _, request_id, label = heapq.heappop(self._labels)
                            break
                        if self._sending_done.is_set() and not self.config.flush_feedback:
                            self._tally.feedback_dropped += len(self._labels)
                            self._labels.clear()
                            return
                        wait = self._labels[0][0] - time.monotonic() if self._labels else 0.2
                        self._labels_lock.wait(timeout=min(max(wait, 0.001), 0.2))
                try:
                    response = session.post(
                        url, json={"request_id": request_id, "label": label, "source": "simulator"},
                        timeout=self.config.timeout,
                    )
                    ok = response.status_code == 202
                except requests.RequestException:
                    ok = False
                with self._tally.lock:
                    if ok:
                        self._tally.feedback_posted += 1
                    else:
                        self._tally.feedback_failed += 1
        finally:
            session.close()

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Send for `duration` seconds (or until `stop_event`), post due labels, return the summary."""
        cfg = self.config
        workers = [threading.Thread(target=self._worker, name=f"sim-worker-{i}", daemon=True)
                   for i in range(cfg.workers)]
        poster = threading.Thread(target=self._feedback_poster, name="sim-feedback", daemon=True)
        for thread in [*workers, poster]:
            thread.start()
        started = time.monotonic()
        total = int(cfg.rate * cfg.duration)
        stream = self._requests()
        try:
            for i in range(total):
                due = started + i / cfg.rate
                delay = due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                if self.stop_event.is_set():
                    break
                job = next(stream)
                while True:  # bounded hand-off: when the gateway is slow the achieved rate drops, nothing piles up
                    try:
                        self._jobs.put(job, timeout=0.2)
                        break
                    except queue.Full:
                        if self.stop_event.is_set():
                            break
                if self.stop_event.is_set():
                    break
                self._tally.sent += 1
        finally:
            for _ in workers:
                self._jobs.put(None)
            for thread in workers:
                thread.join()
            sending_seconds = time.monotonic() - started
            self._sending_done.set()
            with self._labels_lock:
                self._labels_lock.notify_all()
            poster.join()
        return self._summary(sending_seconds, time.monotonic() - started)

    def _summary(self, sending_seconds: float, total_seconds: float) -> dict:
        t = self._tally
        errors = t.connection_errors + sum(n for code, n in t.status.items() if code != "200")
        return {
            "url": self.config.url,
            "model": self.config.model,
            "source": f"csv:{self.config.csv}" if self.replay is not None else "demo_models.data",
            "rate_target": self.config.rate,
            "rate_achieved": round(t.sent / sending_seconds, 2) if sending_seconds > 0 else 0.0,
            "duration_s": round(total_seconds, 3),
            "sent": t.sent,
            "answered": t.answered,
            "status_counts": dict(t.status),
            "per_arm": dict(t.arms),
            "per_version": dict(t.versions),
            "errors": errors,
            "connection_errors": t.connection_errors,
            "feedback_posted": t.feedback_posted,
            "feedback_failed": t.feedback_failed,
            "feedback_dropped": t.feedback_dropped,
            "last_error": t.last_error,
            "stopped_early": self.stop_event.is_set(),
        }


def run(
    url: str,
    model: str,
    rate: float,
    duration: float,
    units: int = 1000,
    label_delay: float = 5.0,
    seed: int = 0,
    stop_event: threading.Event | None = None,
    feedback_share: float = 1.0,
    workers: int = 4,
    flush_feedback: bool = True,
    csv: str | Path | None = None,
    label_column: str | None = None,
    unit_column: str | None = None,
) -> dict:
    """Run one simulation in this thread and return its summary (see `SimulationConfig` for the arguments)."""
    config = SimulationConfig(
        url=url, model=model, rate=rate, duration=duration, units=units, label_delay=label_delay, seed=seed,
        feedback_share=feedback_share, workers=workers, flush_feedback=flush_feedback, csv=csv,
        label_column=label_column, unit_column=unit_column,
    )
    return Simulation(config, stop_event).run()
