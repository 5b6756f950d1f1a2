"""Errors raised by the canary hooks; each message says what failed, where, and how to fix it."""

from __future__ import annotations


class GatewayError(Exception):
    """The model gateway answered with an error, or could not be used."""


class GatewayUnavailableError(GatewayError):
    """The gateway did not answer (connection refused, timeout, 5xx) after the retries."""


class GatewayAuthError(GatewayError):
    """The admin token is missing (401) or wrong (403)."""


class GatewayNotFoundError(GatewayError):
    """Unknown model, version or request id (404)."""


class GatewayValidationError(GatewayError):
    """The gateway rejected the values (422): unknown or unloadable version, bad percent, ..."""


class RouteConflictError(GatewayError):
    """Compare-and-set failed (409): the route's generation is not the one this run last wrote."""
