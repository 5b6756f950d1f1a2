"""hooks of the canary rollout package (issue 5)."""
