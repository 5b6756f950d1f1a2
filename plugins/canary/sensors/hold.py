"""Hold sensors: wait for minimum time AND minimum samples per arm, capped by the maximum wait.

Both sensors pull their inputs from upstream XComs by the fixed task ids of Contract 4 (`validate`,
`preflight`, `step_<i>.set_traffic`) and create their hooks in `execute`, never in `__init__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator


class HoldSensor(BaseSensorOperator):
    """Hold traffic step ``step_index`` (1-based) until the look is due, then record the look time.

    :param task_id: the task id inside the step's task group (``hold``).
    :param step_index: 1-based index of the traffic step this hold belongs to.
    """

    template_fields: Sequence[str] = ("step_index",)

    def __init__(self, *, task_id: str, step_index: int, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)
        self.step_index = step_index

    def poke(self, context: Any) -> bool:  # pragma: no cover - stub until the body lands
        raise NotImplementedError("HoldSensor is being built (issue 5)")


class PostDeployHoldSensor(BaseSensorOperator):
    """After promotion, wait ``post_deploy.window`` and ``post_deploy.min_samples`` on the new stable.

    :param task_id: the task id (``post_deploy_hold``).
    """

    template_fields: Sequence[str] = ()

    def __init__(self, *, task_id: str, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)

    def poke(self, context: Any) -> bool:  # pragma: no cover - stub until the body lands
        raise NotImplementedError("PostDeployHoldSensor is being built (issue 5)")
