"""Pure decision engine for canary rollouts: sequential tests, SRM, data quality, drift (no Airflow)."""

from canary.analysis.judge import LookHistory, Verdict, judge
from canary.analysis.policy import MetricPolicy, Policy, PolicyError

__all__ = ["judge", "Policy", "MetricPolicy", "PolicyError", "LookHistory", "Verdict"]
