"""The judge: one look at the data of a rollout, one verdict (Contract 3). Work in progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from canary.analysis.policy import Policy


@dataclass
class LookHistory:
    """Earlier looks of this run, per metric: information fractions and cumulative alpha spent."""

    looks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"looks": list(self.looks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LookHistory:
        return cls(looks=list((d or {}).get("looks", [])))


@dataclass
class Verdict:
    """The judge's decision with its evidence."""

    decision: str
    reason: str
    metrics: list[dict[str, Any]] = field(default_factory=list)


def judge(observations: Any, policy: Policy, history: LookHistory | None = None, is_last_step: bool = False):
    raise NotImplementedError("the judge is being written (issue 4)")
