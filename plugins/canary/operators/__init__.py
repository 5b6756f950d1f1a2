"""Operators of a rollout. Cheap to import: no pandas, scipy or Great Expectations at module level."""

from __future__ import annotations

from canary.operators.analyze import AnalyzeOperator

__all__ = ["AnalyzeOperator"]
