"""Triggers of a rollout: the hold of one traffic step, the post-deployment hold, and a plain wait.

Each trigger's ``__init__`` and ``serialize()`` are written as a pair (same names, JSON values only). ``run()``
is async, does its blocking I/O (HTTP, SQL) through ``asyncio.to_thread``, and yields one small JSON
``TriggerEvent``. Everything a hold decides is recomputed from the recorded step start, so a trigger that
runs twice (triggerer restart, task retry) reaches the same conclusion.

The triggerer imports this module; it is on ``sys.path`` through ``plugins/`` (not a DAG bundle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from canary.hooks.timeutil import iso, parse_ts, utcnow

_CLASSPATH = "canary.triggers.hold"


@dataclass(frozen=True)
class HoldCheck:
    """The outcome of one poll of a hold.

    :param done: the hold is over (a look is due).
    :param reason: ``min_reached``, ``max_wait`` or ``circuit_breaker`` when done; else what is missing.
    :param look_at: ISO time of this poll (the recorded look time when ``done``).
    :param elapsed_s: seconds since the step started.
    :param counts: per-arm ``{"requests", "labelled"}``.
    :param breaker: the circuit breaker's finding, when it fired.
    """

    done: bool
    reason: str
    look_at: str
    elapsed_s: float
    counts: dict[str, dict[str, int]]
    breaker: dict[str, Any] | None = None

    def to_event(self) -> dict[str, Any]:
        """The JSON payload of the trigger event (and the sensor's XCom)."""
        return {"status": "ok", **asdict(self)}


def check_hold(
    *,
    plan: dict[str, Any],
    pre: dict[str, Any],
    step_index: int,
    step_started_at: str,
    generation: int,
    renew: bool = True,
) -> HoldCheck:
    """One poll of the hold of step ``step_index``: renew the lease, count per arm, maybe run the breaker.

    Blocking (HTTP + SQL); the trigger calls it through ``asyncio.to_thread``.
    Raises the hooks' errors (route changed, gateway unavailable) to the caller.
    """
    from canary import runtime

    settings = runtime.hold_settings(plan)
    now = utcnow()
    started = parse_ts(step_started_at)
    elapsed = max(0.0, (now - started).total_seconds())
    if renew:
        runtime.renew_lease(plan, pre, generation)
    label_cutoff = now - timedelta(seconds=settings.label_delay_s) if settings.needs_labels else None
    counts = runtime.arm_counts(plan, pre, start=started, end=now, label_cutoff=label_cutoff)

    def enough(arm: str) -> bool:
        c = counts[arm]
        if c["requests"] < settings.min_samples:
            return False
        return not settings.needs_labels or c["labelled"] >= settings.min_labelled

    look_at = iso(now)
    if elapsed >= settings.min_duration_s and enough("stable") and enough("canary"):
        return HoldCheck(True, "min_reached", look_at, elapsed, counts)
    if elapsed >= settings.max_wait_s:
        return HoldCheck(True, "max_wait", look_at, elapsed, counts)
    if settings.circuit_breaker:
        fired = runtime.circuit_breaker(plan, counts)
        if fired:
            return HoldCheck(True, "circuit_breaker", look_at, elapsed, counts, breaker=fired)
    missing = []
    if elapsed < settings.min_duration_s:
        missing.append(f"time {elapsed:.0f}/{settings.min_duration_s:.0f}s")
    for arm in ("stable", "canary"):
        if counts[arm]["requests"] < settings.min_samples:
            missing.append(f"{arm} samples {counts[arm]['requests']}/{settings.min_samples}")
        elif settings.needs_labels and counts[arm]["labelled"] < settings.min_labelled:
            missing.append(f"{arm} matured labels {counts[arm]['labelled']}/{settings.min_labelled}")
    return HoldCheck(False, "waiting: " + ", ".join(missing), look_at, elapsed, counts)


class HoldTrigger(BaseTrigger):
    """Hold step ``step_index`` until min time AND min samples per arm (and matured labels), capped by max wait.

    :param plan: the resolved plan (``validate``'s XCom).
    :param pre: the pre-flight result (``preflight``'s XCom).
    :param step_index: 1-based step index.
    :param step_started_at: ISO time the step's traffic took effect (the gateway's ``updated_at``).
    :param generation: the route generation this run wrote for the step (to renew the lease).
    :param poll_interval: seconds between polls.
    """

    def __init__(
        self,
        *,
        plan: dict[str, Any],
        pre: dict[str, Any],
        step_index: int,
        step_started_at: str,
        generation: int,
        poll_interval: float,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.pre = pre
        self.step_index = int(step_index)
        self.step_started_at = step_started_at
        self.generation = int(generation)
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Classpath and the exact ``__init__`` keyword arguments."""
        return (
            f"{_CLASSPATH}.HoldTrigger",
            {
                "plan": self.plan,
                "pre": self.pre,
                "step_index": self.step_index,
                "step_started_at": self.step_started_at,
                "generation": self.generation,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the hold is over; yield one event (``status`` ``ok`` or ``error``)."""
        while True:
            try:
                result = await asyncio.to_thread(
                    check_hold,
                    plan=self.plan,
                    pre=self.pre,
                    step_index=self.step_index,
                    step_started_at=self.step_started_at,
                    generation=self.generation,
                )
            except Exception as exc:  # noqa: BLE001 - reported to the task, which fails safe
                yield TriggerEvent(
                    {"status": "error", "error_type": type(exc).__name__, "message": str(exc)}
                )
                return
            if result.done:
                yield TriggerEvent(result.to_event())
                return
            self.log.info("hold of step %d: %s", self.step_index, result.reason)
            await asyncio.sleep(self.poll_interval)


def check_post_deploy(*, plan: dict[str, Any], pre: dict[str, Any], promoted_at: str) -> HoldCheck:
    """One poll of the post-deployment hold: ``post_deploy.window`` elapsed and ``min_samples`` served."""
    from canary import runtime

    window_s, min_samples = runtime.post_deploy_settings(plan)
    now = utcnow()
    started = parse_ts(promoted_at)
    elapsed = max(0.0, (now - started).total_seconds())
    n = runtime.version_count(plan, pre, start=started, end=now)
    counts = {"stable": {"requests": n, "labelled": 0}}
    look_at = iso(now)
    if elapsed >= window_s and n >= min_samples:
        return HoldCheck(True, "min_reached", look_at, elapsed, counts)
    # The cap: twice the window; then the drift check runs on what there is and says so.
    if elapsed >= 2 * window_s and elapsed >= window_s + 60:
        return HoldCheck(True, "max_wait", look_at, elapsed, counts)
    return HoldCheck(False, f"waiting: time {elapsed:.0f}/{window_s:.0f}s, samples {n}/{min_samples}",
                     look_at, elapsed, counts)


class PostDeployHoldTrigger(BaseTrigger):
    """Wait after promotion until the new stable has served ``post_deploy.window`` and ``min_samples``.

    :param plan: the resolved plan.
    :param pre: the pre-flight result.
    :param promoted_at: ISO time of the promotion (the gateway's ``updated_at``).
    :param poll_interval: seconds between polls.
    """

    def __init__(self, *, plan: dict[str, Any], pre: dict[str, Any], promoted_at: str, poll_interval: float) -> None:
        super().__init__()
        self.plan = plan
        self.pre = pre
        self.promoted_at = promoted_at
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Classpath and the exact ``__init__`` keyword arguments."""
        return (
            f"{_CLASSPATH}.PostDeployHoldTrigger",
            {"plan": self.plan, "pre": self.pre, "promoted_at": self.promoted_at,
             "poll_interval": self.poll_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the post-deployment window is complete."""
        while True:
            try:
                result = await asyncio.to_thread(
                    check_post_deploy, plan=self.plan, pre=self.pre, promoted_at=self.promoted_at
                )
            except Exception as exc:  # noqa: BLE001
                yield TriggerEvent({"status": "error", "error_type": type(exc).__name__, "message": str(exc)})
                return
            if result.done:
                yield TriggerEvent(result.to_event())
                return
            self.log.info("post-deployment hold: %s", result.reason)
            await asyncio.sleep(self.poll_interval)


class LookAgainTrigger(BaseTrigger):
    """Wait ``seconds`` after ``since`` (an ISO time), renewing the route's lease meanwhile, then fire.

    Used by the analyze loop when the verdict is ``extend``. Tolerates running twice: the end time is
    absolute (``since + seconds``).

    :param plan: the resolved plan.
    :param pre: the pre-flight result.
    :param generation: route generation whose lease to renew.
    :param since: ISO time the wait is measured from (the last look).
    :param seconds: how long to wait.
    :param carry: JSON state handed back unchanged in the event (the analyze loop's look index and
        history), so the resumed task does not depend on how the scheduler merges ``next_kwargs``.
    """

    def __init__(
        self,
        *,
        plan: dict[str, Any],
        pre: dict[str, Any],
        generation: int,
        since: str,
        seconds: float,
        carry: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.pre = pre
        self.generation = int(generation)
        self.since = since
        self.seconds = float(seconds)
        self.carry = carry

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Classpath and the exact ``__init__`` keyword arguments."""
        return (
            f"{_CLASSPATH}.LookAgainTrigger",
            {"plan": self.plan, "pre": self.pre, "generation": self.generation, "since": self.since,
             "seconds": self.seconds, "carry": self.carry},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Sleep in short slices until the end time, renewing the lease each slice."""
        from canary import runtime

        end = parse_ts(self.since) + timedelta(seconds=self.seconds)
        while True:
            try:
                await asyncio.to_thread(runtime.renew_lease, self.plan, self.pre, self.generation)
            except Exception as exc:  # noqa: BLE001
                yield TriggerEvent({"status": "error", "error_type": type(exc).__name__, "message": str(exc)})
                return
            left = (end - utcnow()).total_seconds()
            if left <= 0:
                # The planned time, not now: a replayed look uses the same window.
                yield TriggerEvent({"status": "ok", "look_at": iso(end), "carry": self.carry})
                return
            await asyncio.sleep(min(left, max(1.0, runtime.hold_settings(self.plan).poll_interval_s)))
