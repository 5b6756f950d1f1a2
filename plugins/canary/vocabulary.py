"""The metric vocabulary shared by the spec (parse time) and the judge: one definition, no imports.

It lives outside ``canary.analysis`` so that the spec can use it while DAG files are parsed without
importing the analysis package (numpy, scipy).
"""

#: Where a metric's per-request value comes from (Contract 3).
SOURCES = (
    "error",
    "latency_ms",
    "score",
    "prediction",
    "null_score",
    "label",
    "mismatch",
    "abs_error",
    "squared_error",
)
#: Sources that need feedback (a label) and honour ``label_delay``.
LABEL_SOURCES = ("label", "mismatch", "abs_error", "squared_error")
KINDS = ("binary", "continuous", "latency_threshold")
DIRECTIONS = ("decrease", "increase")
