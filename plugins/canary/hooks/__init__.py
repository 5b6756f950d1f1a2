"""Hooks of the canary package: the traffic router (model gateway) and the prediction log.

Import the submodules directly in task code (``from canary.hooks.router import TrafficRouterHook``); this
package re-exports them lazily so that importing ``canary.hooks`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictionLogHook", "Route", "TrafficRouterHook"]


def __getattr__(name: str) -> Any:
    if name in ("TrafficRouterHook", "Route"):
        from canary.hooks import router

        return getattr(router, name)
    if name == "PredictionLogHook":
        from canary.hooks.prediction_log import PredictionLogHook

        return PredictionLogHook
    raise AttributeError(name)
