"""Validation of model, version and request names (Contract 1).

Names end up in filesystem paths (the model directory) and in SQL parameters, so they are checked against one
strict pattern before any use: no path separators, no `.`/`..`, at most 64 characters.
"""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_UNIT_ID_LENGTH = 256


class InvalidName(ValueError):
    """A model, version or request id that does not match the allowed pattern."""


def is_valid_name(name: object) -> bool:
    """True when `name` is a usable model or version name."""
    return isinstance(name, str) and name not in (".", "..") and NAME_PATTERN.fullmatch(name) is not None


def check_name(kind: str, name: object) -> str:
    """Return `name` when it is a valid model/version name, else raise `InvalidName` saying why and how to fix."""
    if not is_valid_name(name):
        raise InvalidName(
            f"{kind} name {name!r} is not allowed: use 1-64 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit (pattern ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$)"
        )
    return name  # type: ignore[return-value]
