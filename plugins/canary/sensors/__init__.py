"""Deferrable sensors of a rollout: the hold of each traffic step and the post-deployment hold.

Cheap to import: the DAG file imports these at parse time (no pandas, scipy or Great Expectations here).
"""

from __future__ import annotations

from canary.sensors.hold import HoldSensor, PostDeployHoldSensor

__all__ = ["HoldSensor", "PostDeployHoldSensor"]
