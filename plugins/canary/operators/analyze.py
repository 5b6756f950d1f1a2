"""The analyze loop of one traffic step: look, and while the verdict is `extend`, defer and look again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator


class AnalyzeOperator(BaseOperator):
    """Judge step ``step_index`` (1-based) on the recorded windows; the verdict dict goes to XCom.

    :param task_id: the task id inside the step's task group (``analyze``).
    :param step_index: 1-based index of the traffic step to judge.
    """

    template_fields: Sequence[str] = ("step_index",)

    def __init__(self, *, task_id: str, step_index: int, **kwargs: Any) -> None:
        super().__init__(task_id=task_id, **kwargs)
        self.step_index = step_index

    def execute(self, context: Any) -> Any:  # pragma: no cover - stub until the body lands
        raise NotImplementedError("AnalyzeOperator is being built (issue 5)")
