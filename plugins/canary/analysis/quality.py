"""Data quality of the canary's logged predictions with Great Expectations 1.x.

Suites live in ``include/expectations/<suite>.json`` (GX suite JSON: ``name`` and ``expectations`` with
``type`` and ``kwargs``). Great Expectations is imported inside :func:`validate` (it takes seconds to import,
and DAG files must stay cheap to parse); the context is ephemeral (nothing written to disk) and usage
statistics are off (``GX_ANALYTICS_ENABLED=False``). The rows are a bounded random sample of the canary's
window (``canary.analysis.sql.sample_rows``, ``data_quality.sample_size`` rows, 5,000 by default), so one
validation takes well under a second.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "include" / "expectations"


def suite_dir() -> Path:
    """``CANARY_EXPECTATIONS_DIR`` when set, else ``include/expectations`` of this repository."""
    return Path(os.environ.get("CANARY_EXPECTATIONS_DIR", DEFAULT_DIR))


def load_suite(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """Read the suite ``<directory>/<name>.json``; the name is validated (it becomes a path)."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"data_quality.suite={name!r} is not a valid suite name: use 1-64 letters, digits, "
                         "'.', '_' or '-' (the file include/expectations/<suite>.json)")
    path = Path(directory or suite_dir()) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"data_quality.suite={name!r}: no file {path}; create it or fix the suite name")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the suite file") from exc
    if not isinstance(suite.get("expectations"), list):
        raise ValueError(f"{path}: needs a list 'expectations' of {{'type', 'kwargs'}} objects")
    return suite


def _observed(res: Any) -> Any:
    r = res.result or {}
    if "observed_value" in r:
        v = r["observed_value"]
        return None if isinstance(v, float) and math.isnan(v) else v
    if "unexpected_percent" in r:
        ex = [None if isinstance(x, float) and math.isnan(x) else x for x in (r.get("partial_unexpected_list") or [])[:3]]
        return f"{r['unexpected_percent']:.3g}% unexpected ({r.get('unexpected_count')} rows), e.g. {ex}"
    if res.exception_info and res.exception_info.get("raised_exception"):
        return f"error: {res.exception_info.get('exception_message')}"
    if res.expectation_config.type == "expect_column_to_exist":
        return "column missing"
    return None


def validate(rows: Any, suite: str | dict[str, Any], *, directory: str | Path | None = None,
             only_ok: bool = True) -> dict[str, Any]:
    """Validate rows (a DataFrame, e.g. from ``sample_rows``) against a suite.

    :param only_ok: check only rows with ``status == 'ok'`` (errors are the error metric's business).
    :returns: ``{"suite", "success", "evaluated", "rows", "failures": [{"expectation", "column",
        "observed", "kwargs"}]}``; ``failures`` names every failed expectation with the observed value.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx
    import pandas as pd

    spec = load_suite(suite, directory) if isinstance(suite, str) else suite
    df = rows
    if only_ok and "status" in df.columns:
        df = df[df["status"] == "ok"]
    df = pd.DataFrame(df).reset_index(drop=True)
    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    try:
        gsuite = gx.ExpectationSuite(name=spec.get("name", "suite"), expectations=spec["expectations"])
    except Exception as exc:
        raise ValueError(f"suite {spec.get('name')!r} has an invalid expectation: {exc}") from exc
    asset = ctx.data_sources.add_pandas("canary_rows").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(gsuite)
    failures = []
    for res in result.results:
        if res.success:
            continue
        cfg = res.expectation_config
        failures.append({"expectation": cfg.type, "column": cfg.kwargs.get("column"), "observed": _observed(res),
                         "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}})
    return {"suite": spec.get("name"), "success": bool(result.success) and not failures,
            "evaluated": len(result.results), "rows": int(len(df)), "failures": failures}
