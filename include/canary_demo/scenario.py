"""What the demo runs: the rollout spec with hold windows of seconds, and the two expected outcomes.

The demo spec is the project's own ``include/rollouts/fraud.yaml`` with the durations shortened (holds,
polls, label delay, post-deployment window, lease) so a whole rollout takes about a minute; everything else
(metrics, margins, alphas, gates) is the real spec. The trigger params (candidate, steps, hold minimums)
are passed as the run conf, exactly as the UI form would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canary_demo.stack import REPO

MODEL = "fraud"
STABLE = "v1"

#: Durations of the demo spec (seconds). Labels arrive within ``label_delay`` from the simulator. The judge's
#: time clusters are 10 s instead of the spec's minute (``clusters.width``, docs/spec.md): with minute
#: clusters no metric could be tested before three minutes of a step, and with 3-4 clusters the tests have
#: 2-3 degrees of freedom. The cap (``max_wait``) leaves room for a few extra looks at the last step.
DEMO_TIMINGS: dict[str, Any] = {
    "hold": {"min_duration": 20, "min_samples": 150, "max_wait": 240, "poll_interval": 3},
    "clusters": {"width": 10, "min_per_arm": 3},
    "lease": 300,
    "deadline": 900,
    "post_deploy": {"window": 10, "min_samples": 100},
    "label_delay": 5,
}


@dataclass(frozen=True)
class RolloutCase:
    """One rollout of the demo and what must come out of it.

    :param title: what the case shows.
    :param candidate: the version rolled out.
    :param expect: ``promoted`` or ``rolled_back``.
    :param params: the trigger params (the run conf, as from the UI form).
    """

    title: str
    candidate: str
    expect: str
    params: dict[str, Any] = field(default_factory=dict)

    def conf(self) -> dict[str, Any]:
        """The run conf: the candidate plus the case's params."""
        return {"candidate": self.candidate, **self.params}


CASES: tuple[RolloutCase, ...] = (
    RolloutCase(
        title="good candidate: stable's model family on better features, exported to numpy: more accurate, faster",
        candidate="v5",
        expect="promoted",
        params={"steps": [10, 50], "hold_min_duration": "20s", "hold_min_samples": 150},
    ),
    RolloutCase(
        title="bad candidate: fails on a country it never saw, NaN scores on large amounts, slower",
        candidate="v4",
        expect="rolled_back",
        params={"steps": [10, 50], "hold_min_duration": "20s", "hold_min_samples": 150},
    ),
)


SPECS = REPO / "include" / "rollouts"


def demo_spec(source: Path | None = None, timings: dict[str, Any] | None = None,
              webhook_conn_id: str | None = None) -> dict[str, Any]:
    """The demo spec as a dict: the real spec file with :data:`DEMO_TIMINGS` applied (and the webhook
    connection of the demo's notification receiver, when given)."""
    import yaml

    source = source or SPECS / f"{MODEL}.yaml"
    spec = yaml.safe_load(source.read_text())
    t = dict(DEMO_TIMINGS if timings is None else timings)
    spec["hold"] = dict(t["hold"])
    if "clusters" in t:
        spec["clusters"] = dict(t["clusters"])
    spec["lease"] = t["lease"]
    spec["deadline"] = t["deadline"]
    spec["post_deploy"] = dict(t["post_deploy"])
    for metric in spec.get("metrics", []):
        if metric.get("label_delay") is not None:
            metric["label_delay"] = t["label_delay"]
    if webhook_conn_id:
        spec["notifications"] = {**(spec.get("notifications") or {}), "webhook_conn_id": webhook_conn_id}
    spec["description"] = (
        f"Demo copy of include/rollouts/{source.name} with hold windows of seconds (written by canary_demo).\n"
        + str(spec.get("description") or "")
    )
    return spec


def write_demo_spec(folder: Path, timings: dict[str, Any] | None = None, source: Path | None = None,
                    webhook_conn_id: str | None = None) -> Path:
    """Write the demo copy of ``source`` (default the fraud spec) into ``folder`` and check it with the
    real loader (which names the field if the demo timings do not fit the spec rules)."""
    import yaml
    from canary.spec import load_spec

    source = source or SPECS / f"{MODEL}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    path.write_text(
        f"# Written by canary_demo: {source.name} with holds of seconds. Edit include/rollouts/{source.name}.\n"
        + yaml.safe_dump(demo_spec(source, timings, webhook_conn_id), sort_keys=False)
    )
    load_spec(path)
    return path


def write_demo_specs(folder: Path, timings: dict[str, Any] | None = None, source_dir: Path | None = None,
                     warn: Any = print) -> list[Path]:
    """Demo copies of every spec in ``source_dir`` (default ``include/rollouts``; for ``make airflow``).

    A spec that does not load (a mistake in a user's own spec) is copied unchanged, so Airflow shows it as
    a ``broken-spec`` placeholder DAG with the loader's message, like in production, and the other specs
    still get their DAGs; ``warn`` is told which one and why."""
    import yaml
    from canary.spec import SpecError

    written = []
    for source in sorted((source_dir or SPECS).glob("*.yaml")):
        try:
            written.append(write_demo_spec(folder, timings, source))
        except (SpecError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
            target = folder / source.name
            target.write_text(source.read_text())
            warn(f"{source}: not a valid rollout spec, copied unchanged (Airflow shows it as a broken-spec "
                 f"DAG with this message):\n{exc}")
            written.append(target)
    return written
