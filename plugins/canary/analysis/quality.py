"""Data quality of the canary's logged predictions with Great Expectations 1.x.

Suites live in ``include/expectations/<suite>.json`` (GX suite JSON: ``name`` and ``expectations`` with
``type`` and ``kwargs``); :func:`load_suite` resolves every expectation with GX (:func:`check_suite`) because
GX itself only logs and drops an unknown type. Great Expectations is imported inside functions (it takes
seconds to import, and DAG files must stay cheap to parse); the context is ephemeral (nothing written to disk) and usage
statistics are off (``GX_ANALYTICS_ENABLED=False``). The rows are a bounded random sample of the canary's
window (``canary.analysis.sql.sample_rows``, ``data_quality.sample_size`` rows, 5,000 by default), so one
validation takes well under a second.
"""

from __future__ import annotations

import difflib
import functools
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


def suite_path(name: str, directory: str | Path | None = None) -> Path:
    """The file of suite ``name``; the name is validated (it becomes a path)."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"data_quality.suite={name!r} is not a valid suite name: use 1-64 letters, digits, "
                         "'.', '_' or '-' (the file include/expectations/<suite>.json)")
    return Path(directory or suite_dir()) / f"{name}.json"


def load_suite(name: str, directory: str | Path | None = None, *, check: bool = True) -> dict[str, Any]:
    """Read the suite ``<directory>/<name>.json`` and (``check``) resolve every expectation with GX.

    The check matters because GX's ``ExpectationSuite`` only logs an unknown expectation type and drops it: a
    typo would silently switch that expectation off for the whole rollout. ``check=False`` reads the JSON only
    (no Great Expectations import).
    """
    path = suite_path(name, directory)
    if not path.is_file():
        raise FileNotFoundError(f"data_quality.suite={name!r}: no file {path}; create it or fix the suite name")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the suite file") from exc
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        raise ValueError(f"{path}: needs a list 'expectations' of {{'type', 'kwargs'}} objects")
    if check:
        check_suite(suite, where=str(path))
    return suite


@functools.lru_cache(maxsize=1)
def expectation_classes() -> dict[str, type]:
    """GX's expectation classes by their suite type: ``expect_column_values_to_be_between`` ->
    ``ExpectColumnValuesToBeBetween`` (every public class in ``great_expectations.expectations`` carries its
    snake_case name as ``expectation_type``). Imports GX (seconds), once per process."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations.expectations as gxe

    out: dict[str, type] = {}
    for attr in dir(gxe):
        cls = getattr(gxe, attr)
        if isinstance(cls, type) and issubclass(cls, gxe.Expectation):
            kind = getattr(cls, "expectation_type", None)
            if isinstance(kind, str) and kind:
                out[kind] = cls
    return out


def _expectation_class(kind: str) -> type | None:
    """The class of ``kind``: a built-in one, else one registered with GX (a custom ``Expectation``
    subclass registers itself when its module is imported; GX resolves suite entries the same way)."""
    cls = expectation_classes().get(kind)
    if cls is not None:
        return cls
    try:
        from great_expectations.expectations.registry import get_expectation_impl

        return get_expectation_impl(kind)
    except Exception:  # noqa: BLE001 - ExpectationNotFoundError, or a GX without this internal module
        return None


def _kwargs_error(exc: Exception) -> str:
    """pydantic's errors as ``column: field required`` (its default text spans several lines)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or 'kwargs'}: {e.get('msg')}" for e in errors())
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return " ".join(str(exc).split())


def check_suite(suite: dict[str, Any], where: str | None = None) -> int:
    """Build every expectation of a suite with GX; raise one ``ValueError`` naming every bad one.

    Unknown types get a did-you-mean from GX's own expectation names; kwargs are validated by constructing
    the expectation class (so a missing ``column`` or a misspelt keyword is named here, not at the first look).

    :param where: the suite file for the message (default: the suite's name).
    :returns: the number of expectations (all of them build).
    """
    where = where or f"suite {suite.get('name')!r}"
    known = sorted(expectation_classes())  # imports GX with GX_ANALYTICS_ENABLED=False first
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    problems = []
    for i, entry in enumerate(suite.get("expectations") or []):
        at = f"expectations[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{at} is {entry!r}: each expectation is an object {{\"type\": ..., \"kwargs\": {{...}}}}")
            continue
        kind = entry.get("type")
        if kind is None and "expectation_type" in entry:
            problems.append(f"{at} uses the key 'expectation_type' of Great Expectations 0.x: rename it to 'type' "
                            "(GX 1.x suite JSON)")
            continue
        if not isinstance(kind, str) or not kind:
            problems.append(f"{at} has no 'type': add the expectation's name, e.g. \"expect_column_to_exist\"")
            continue
        kwargs = entry.get("kwargs", {})
        if not isinstance(kwargs, dict):
            problems.append(f"{at} ({kind}): 'kwargs' is {kwargs!r}, must be an object, e.g. {{\"column\": \"score\"}}")
            continue
        cls = _expectation_class(kind)
        if cls is None:
            close = difflib.get_close_matches(kind, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{at}: unknown expectation type {kind!r}; {hint}fix the type in the suite file "
                            "(GX 1.x names, listed at https://greatexpectations.io/expectations/)")
            continue
        try:
            ExpectationConfiguration(**entry).to_domain_obj()
        except Exception as exc:  # noqa: BLE001 - pydantic ValidationError, TypeError on unknown entry keys, ...
            problems.append(f"{at} ({kind}): invalid kwargs {kwargs!r}: {_kwargs_error(exc)}. Fix the kwargs "
                            f"(the arguments of {cls.__name__} in the GX docs)")
    if problems:
        raise ValueError(f"{where}: {len(problems)} invalid expectation(s); Great Expectations would drop or "
                         "refuse them:\n  " + "\n  ".join(problems))
    return len(suite.get("expectations") or [])


COLUMN_KWARGS = ("column", "column_A", "column_B")
COLUMN_LIST_KWARGS = ("column_list", "column_set")


def suite_columns(suite: dict[str, Any]) -> list[tuple[int, str, str]]:
    """Every column a suite names: ``(index, expectation type, column)`` from the kwargs ``column``,
    ``column_A``/``column_B`` (pair expectations) and ``column_list``/``column_set``."""
    out = []
    for i, entry in enumerate(suite.get("expectations") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("kwargs"), dict):
            continue
        kw, kind = entry["kwargs"], str(entry.get("type"))
        for key in COLUMN_KWARGS:
            if isinstance(kw.get(key), str):
                out.append((i, kind, kw[key]))
        for key in COLUMN_LIST_KWARGS:
            if isinstance(kw.get(key), (list, tuple)):
                out.extend((i, kind, c) for c in kw[key] if isinstance(c, str))
    return out


def unknown_columns(suite: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    """The suite's columns not in ``columns`` (the rows it will run on), each with a did-you-mean."""
    have = set(columns)
    out = []
    for i, kind, col in suite_columns(suite):
        if col not in have:
            close = difflib.get_close_matches(col, sorted(have), n=1, cutoff=0.5)
            out.append({"index": i, "expectation": kind, "column": col, "suggestion": close[0] if close else None})
    return out


def _error(res: Any) -> str | None:
    """The error message of an expectation that raised: GX 1.x keeps it either at the top of
    ``exception_info`` or per metric (``{MetricConfigurationID: {"raised_exception", ...}}``)."""
    info = res.exception_info or {}
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "raised an exception")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "raised an exception")
    return None


def _observed(res: Any) -> Any:
    error = _error(res)
    if error is not None:
        return f"error: {error}"
    r = res.result or {}
    if "observed_value" in r:
        v = r["observed_value"]
        return None if isinstance(v, float) and math.isnan(v) else v
    if "unexpected_percent" in r:
        ex = [None if isinstance(x, float) and math.isnan(x) else x for x in (r.get("partial_unexpected_list") or [])[:3]]
        return f"{r['unexpected_percent']:.3g}% unexpected ({r.get('unexpected_count')} rows), e.g. {ex}"
    if res.expectation_config.type == "expect_column_to_exist":
        return "column missing"
    return None


def validate(rows: Any, suite: str | dict[str, Any], *, directory: str | Path | None = None,
             only_ok: bool = True) -> dict[str, Any]:
    """Validate rows (a DataFrame, e.g. from ``sample_rows``) against a suite.

    :param only_ok: check only rows with ``status == 'ok'`` (errors are the error metric's business).
    :returns: ``{"suite", "success", "evaluated", "rows", "failures": [{"expectation", "column",
        "observed", "kwargs"}]}``; ``failures`` names every failed expectation with the observed value. An
        expectation that raised (e.g. a column the rows lack) is a failure with ``observed`` "error: <message>";
        ``evaluated`` is always the suite's length, so no expectation silently drops out of the count.
    :raises ValueError: the suite has an expectation GX cannot build (:func:`check_suite`).
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx
    import pandas as pd

    spec = load_suite(suite, directory) if isinstance(suite, str) else suite
    if not isinstance(suite, str):
        check_suite(spec)
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
    expected = len(spec["expectations"])
    if len(gsuite.expectations) != expected:  # GX logs and drops what it cannot build; check_suite should stop it
        raise ValueError(f"suite {spec.get('name')!r}: Great Expectations built {len(gsuite.expectations)} of "
                         f"{expected} expectations; fix the suite file (see the GX log above)")
    asset = ctx.data_sources.add_pandas("canary_rows").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(gsuite)
    failures = []
    for res in result.results:
        if res.success is True and _error(res) is None:
            continue
        cfg = res.expectation_config
        failures.append({"expectation": cfg.type, "column": cfg.kwargs.get("column"), "observed": _observed(res),
                         "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}})
    if len(result.results) < expected:
        failures.append({"expectation": "(suite)", "column": None, "kwargs": {},
                         "observed": f"error: GX returned {len(result.results)} results for {expected} expectations"})
    return {"suite": spec.get("name"), "success": bool(result.success) and not failures,
            "evaluated": max(expected, len(result.results)), "rows": int(len(df)), "failures": failures}
