"""UTC time helpers shared by the hooks, triggers and runtime (the log stores naive UTC timestamps)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


def parse_ts(value: str | datetime) -> datetime:
    """Parse an ISO-8601 time (``Z`` allowed) into an aware UTC datetime; naive input is taken as UTC."""
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def to_naive_utc(value: str | datetime) -> datetime:
    """The naive-UTC form the prediction log stores (Contract 2)."""
    return parse_ts(value).replace(tzinfo=None)


def iso(value: datetime) -> str:
    """ISO-8601 UTC text with a ``Z``-free ``+00:00`` offset, for XCom."""
    return parse_ts(value).isoformat()
