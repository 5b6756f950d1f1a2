"""Notifications for rollout events: a webhook (requests) and e-mail (the SMTP provider).

Both are Airflow notifiers (``airflow.sdk.BaseNotifier``), so they can also be used directly as
``on_failure_callback`` / ``on_success_callback`` of a DAG or task. The runtime calls the helper
:func:`notify` on rollback, promotion and failure with the payload of the run::

    notify("rollback", {"model": "fraud", "candidate": "v2", "decision": "rollback", "reason": "...",
                        "run_id": "...", "report_path": "reports/..."}, spec.notifications)

The webhook URL, headers and credentials come from an Airflow HTTP Connection (``webhook_conn_id`` in the
spec's ``notifications``). The connection can be given as JSON, for example::

    AIRFLOW_CONN_CANARY_WEBHOOK='{"conn_type": "http", "host": "hooks.example.com", "schema": "https",
                                  "password": "<token>", "extra": {"endpoint": "/canary"}}'

``host`` may also be a full URL (``https://hooks.example.com/services/T000/B000/XXXX``). A password
without a login is sent as ``Authorization: Bearer <password>``; a login and password as basic auth. Extra
keys other than the options below are sent as HTTP headers (as Airflow's ``HttpHook`` does); a
``headers`` object in the extra is merged in too. Options in the extra: ``endpoint`` (path appended to
the host), ``timeout`` (seconds, default 10), ``verify`` (TLS verification, default true).

Secrets never reach the log: only the scheme, host and port of the webhook URL are logged (webhook URLs
often carry a token in the path), and header values and passwords are registered with Airflow's secret
masker before any request is made.

A failing channel does not stop the others and never raises out of :func:`notify`: a rollback must
complete even when the chat service is down. Every attempt is returned as a :class:`NotificationResult`
and failures are logged as warnings naming the channel, the connection id and the fix.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)

#: Events the runtime reports. ``failure`` is any run that ended failed for a reason other than a rollback;
#: ``pause`` asks the owners to decide a canary that was inconclusive at its cap (promote or roll back).
EVENTS = ("rollback", "promotion", "failure", "pause")

#: Keys of the payload every notification carries (values may be null when unknown).
PAYLOAD_KEYS = ("event", "model", "candidate", "stable", "decision", "reason", "run_id", "report_path")

_EXTRA_OPTIONS = {"endpoint", "timeout", "verify", "verify_ssl", "headers", "retries"}
_DEFAULT_TIMEOUT = 10.0


class NotificationError(RuntimeError):
    """A notification could not be delivered (the message says which channel and why)."""


@dataclass(frozen=True)
class NotificationResult:
    """Outcome of one notification channel.

    :param channel: ``webhook`` or ``email``.
    :param target: where it went, safe to log (connection id, or the recipients).
    :param ok: whether it was delivered (HTTP 2xx, or the SMTP server accepted it).
    :param detail: status code or error message (never a secret).
    """

    channel: str
    target: str
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for XCom and the report."""
        return asdict(self)


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook resolved from an Airflow HTTP Connection.

    :param url: the full URL to POST to (may contain a secret: do not log it; use ``safe_url``).
    :param headers: HTTP headers, including any authorization.
    :param auth: ``(login, password)`` for basic auth, or None.
    :param timeout: seconds for connect and read.
    :param verify: TLS certificate verification.
    :param retries: extra attempts on connection errors and 5xx answers.
    """

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    auth: tuple[str, str] | None = None
    timeout: float = _DEFAULT_TIMEOUT
    verify: bool = True
    retries: int = 2

    @property
    def safe_url(self) -> str:
        """Scheme, host and port only: the part of the URL that is safe to print."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}"


def _mask(value: Any) -> None:
    """Register a secret with Airflow's masker so it is redacted if it ever reaches a log line."""
    if not value:
        return
    try:
        from airflow.sdk.log import mask_secret

        mask_secret(str(value))
    except Exception:  # masking is defence in depth; never fail a notification over it
        pass


def _as_bool(value: Any, name: str, conn_id: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise NotificationError(
        f"connection {conn_id!r}: extra {name!r} must be true or false, got {value!r}; fix the connection's extra"
    )


def webhook_target_from_connection(conn: Any) -> WebhookTarget:
    """Build a :class:`WebhookTarget` from an Airflow Connection (anything with the Connection attributes).

    Raises :class:`NotificationError` naming the field when the connection cannot describe a URL.
    """
    conn_id = getattr(conn, "conn_id", "?")
    host = (conn.host or "").strip()
    if not host:
        raise NotificationError(
            f"connection {conn_id!r} has no host; set host to the webhook's host or full URL "
            "(e.g. host=hooks.example.com, schema=https)"
        )
    extra: dict[str, Any] = dict(conn.extra_dejson or {})
    if "://" in host:
        base = host
    else:
        scheme = (conn.schema or "http").strip() or "http"
        if scheme not in {"http", "https"}:
            raise NotificationError(
                f"connection {conn_id!r}: schema must be http or https, got {scheme!r} "
                "(the schema field holds the URL scheme for HTTP connections)"
            )
        base = f"{scheme}://{host}"
        if conn.port:
            base = f"{base}:{int(conn.port)}"
    endpoint = str(extra.get("endpoint") or "")
    if endpoint and not endpoint.startswith("/") and not base.endswith("/"):
        endpoint = "/" + endpoint
    url = base + endpoint
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise NotificationError(
            f"connection {conn_id!r}: the webhook URL must be http(s)://host[:port][/path]; "
            f"got scheme {parts.scheme!r} and host {parts.hostname!r}"
        )

    headers: dict[str, str] = {"Content-Type": "application/json"}
    nested = extra.get("headers") or {}
    if not isinstance(nested, Mapping):
        raise NotificationError(f"connection {conn_id!r}: extra 'headers' must be a JSON object")
    for key, value in [*((k, v) for k, v in extra.items() if k not in _EXTRA_OPTIONS), *nested.items()]:
        headers[str(key)] = str(value)
        _mask(value)

    auth: tuple[str, str] | None = None
    if conn.password:
        _mask(conn.password)
        if conn.login:
            auth = (conn.login, conn.password)
        else:
            headers.setdefault("Authorization", f"Bearer {conn.password}")
    # A webhook URL usually carries its secret in the path or query (Slack, Teams): mask them too.
    if parts.path not in {"", "/"}:
        _mask(parts.path)
    if parts.query:
        _mask(parts.query)

    try:
        timeout = float(extra.get("timeout", _DEFAULT_TIMEOUT))
        retries = int(extra.get("retries", 2))
    except (TypeError, ValueError) as exc:
        raise NotificationError(
            f"connection {conn_id!r}: extra 'timeout' and 'retries' must be numbers ({exc})"
        ) from None
    if timeout <= 0 or retries < 0:
        raise NotificationError(
            f"connection {conn_id!r}: timeout must be > 0 and retries >= 0, got timeout={timeout}, "
            f"retries={retries}"
        )
    verify = _as_bool(extra.get("verify", extra.get("verify_ssl", True)), "verify", conn_id)
    return WebhookTarget(url=url, headers=headers, auth=auth, timeout=timeout, verify=verify, retries=retries)


def post_webhook(target: WebhookTarget, payload: Mapping[str, Any], *, backoff: float = 0.5) -> int:
    """POST ``payload`` as JSON; retry connection errors and 5xx with exponential backoff.

    Returns the HTTP status code. Raises :class:`NotificationError` (without the URL's secret parts) when
    the hook answers 4xx, or still fails after the retries.
    """
    import requests

    body = json.dumps(dict(payload), default=str, sort_keys=True)
    last_error = ""
    for attempt in range(target.retries + 1):
        if attempt:
            time.sleep(backoff * (2 ** (attempt - 1)))
        try:
            response = requests.post(
                target.url,
                data=body.encode("utf-8"),
                headers=target.headers,
                auth=target.auth,
                timeout=target.timeout,
                verify=target.verify,
            )
        except requests.RequestException as exc:
            # The exception text contains the full URL; report only its class and the safe part.
            last_error = f"{type(exc).__name__} connecting to {target.safe_url}"
            continue
        if response.status_code >= 500:
            last_error = f"HTTP {response.status_code} from {target.safe_url}"
            continue
        if response.status_code >= 400:
            raise NotificationError(
                f"webhook {target.safe_url} refused the notification with HTTP {response.status_code}; "
                "check the connection's credentials and endpoint"
            )
        return response.status_code
    raise NotificationError(f"webhook {target.safe_url} failed after {target.retries + 1} attempts: {last_error}")


def payload_from_context(context: Mapping[str, Any], event: str = "failure") -> dict[str, Any]:
    """Build a notification payload from an Airflow callback context (when used as a DAG callback)."""
    dag_run = context.get("dag_run")
    params = context.get("params") or {}
    dag = context.get("dag")
    model = params.get("model") if isinstance(params, Mapping) else None
    if model is None and dag is not None:
        dag_id = getattr(dag, "dag_id", "")
        model = dag_id.split("__", 1)[1] if "__" in dag_id else dag_id
    exception = context.get("exception")
    return {
        "event": event,
        "model": model,
        "candidate": params.get("candidate") if isinstance(params, Mapping) else None,
        "stable": None,
        "decision": None,
        "reason": str(exception) if exception else context.get("reason"),
        "run_id": getattr(dag_run, "run_id", None) or context.get("run_id"),
        "report_path": None,
    }


def _complete_payload(event: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    if event not in EVENTS:
        raise ValueError(f"notification event must be one of {', '.join(EVENTS)}; got {event!r}")
    full = {key: payload.get(key) for key in PAYLOAD_KEYS}
    full.update({k: v for k, v in payload.items() if k not in full})
    full["event"] = event
    full["sent_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return full


class WebhookNotifier(BaseNotifier):
    """POST a JSON rollout event to the webhook of an Airflow HTTP Connection.

    :param webhook_conn_id: the HTTP connection holding the URL, headers and credentials.
    :param event: ``rollback``, ``promotion``, ``failure`` or ``pause``.
    :param payload: the event's fields (see :data:`PAYLOAD_KEYS`); when omitted (used as an Airflow
        callback) they are taken from the callback context.
    """

    template_fields = ("webhook_conn_id",)

    def __init__(
        self, *, webhook_conn_id: str, event: str = "failure", payload: Mapping[str, Any] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if event not in EVENTS:
            raise ValueError(f"WebhookNotifier event must be one of {', '.join(EVENTS)}; got {event!r}")
        self.webhook_conn_id = webhook_conn_id
        self.event = event
        self.payload = dict(payload) if payload is not None else None
        self.last_status: int | None = None

    def notify(self, context: Any) -> None:
        """Send the event; raises :class:`NotificationError` when it cannot be delivered."""
        from airflow.sdk import Connection

        try:
            conn = Connection.get(self.webhook_conn_id)
        except Exception as exc:
            raise NotificationError(
                f"webhook connection {self.webhook_conn_id!r} is not defined ({type(exc).__name__}); "
                f"create it, e.g. AIRFLOW_CONN_{self.webhook_conn_id.upper()}="
                '\'{"conn_type": "http", "host": "...", "schema": "https"}\''
            ) from None
        target = webhook_target_from_connection(conn)
        payload = self.payload if self.payload is not None else payload_from_context(context or {}, self.event)
        body = _complete_payload(self.event, payload)
        self.last_status = post_webhook(target, body)
        self.log.info(
            "Sent %s notification for %s to webhook %s (connection %s): HTTP %s",
            self.event, body.get("model"), target.safe_url, self.webhook_conn_id, self.last_status,
        )


def _email_subject(payload: Mapping[str, Any]) -> str:
    verb = {"rollback": "rolled back", "promotion": "promoted", "failure": "failed", "pause": "paused: promote or roll back?"}[payload["event"]]
    return f"[canary] {payload.get('model')}: candidate {payload.get('candidate')} {verb}"


def _email_html(payload: Mapping[str, Any]) -> str:
    from html import escape

    rows = "".join(
        f"<tr><th align='left'>{escape(str(k))}</th><td>{escape(str(payload.get(k)))}</td></tr>"
        for k in PAYLOAD_KEYS
    )
    return f"<p>{escape(_email_subject(payload))}</p><table>{rows}</table>"


def email_notifier(
    event: str, payload: Mapping[str, Any], to: Sequence[str], smtp_conn_id: str | None = None
) -> BaseNotifier:
    """An SMTP provider ``SmtpNotifier`` carrying the event (subject and an HTML table of the payload).

    The subject and body are built here and escaped; the ``{{`` of Jinja are neutralised so a reason text
    cannot inject template code into the notifier's rendering.
    """
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    full = _complete_payload(event, payload)
    subject = _email_subject(full)
    html = _email_html(full)

    def _no_jinja(text: str) -> str:
        return text.replace("{", "&#123;") if "{" in text else text

    kwargs: dict[str, Any] = {"to": list(to), "subject": _no_jinja(subject), "html_content": _no_jinja(html)}
    if smtp_conn_id:
        kwargs["smtp_conn_id"] = smtp_conn_id
    return SmtpNotifier(**kwargs)


def _get(spec_notifications: Any, name: str, default: Any = None) -> Any:
    if spec_notifications is None:
        return default
    if isinstance(spec_notifications, Mapping):
        return spec_notifications.get(name, default)
    return getattr(spec_notifications, name, default)


def notify(event: str, payload: Mapping[str, Any], spec_notifications: Any) -> list[NotificationResult]:
    """Send ``event`` to every channel the spec's ``notifications`` configures; never raises for delivery.

    :param event: ``rollback``, ``promotion``, ``failure`` or ``pause``.
    :param payload: ``model``, ``candidate``, ``decision``, ``reason``, ``run_id``, ``report_path`` (and
        anything else JSON-serialisable).
    :param spec_notifications: the spec's ``notifications`` (dict or dataclass) with ``webhook_conn_id``
        (an HTTP connection id or null), ``email`` (a list of addresses, may be empty) and optionally
        ``smtp_conn_id`` (defaults to Airflow's ``[email] email_conn_id``, i.e. ``smtp_default``).
    :returns: one :class:`NotificationResult` per configured channel (empty when none is configured).
    """
    if event not in EVENTS:
        raise ValueError(f"notification event must be one of {', '.join(EVENTS)}; got {event!r}")
    results: list[NotificationResult] = []
    conn_id = _get(spec_notifications, "webhook_conn_id")
    if conn_id:
        notifier = WebhookNotifier(webhook_conn_id=conn_id, event=event, payload=payload)
        try:
            notifier.notify({})
            results.append(NotificationResult("webhook", conn_id, True, f"HTTP {notifier.last_status}"))
        except Exception as exc:
            detail = str(exc) if isinstance(exc, NotificationError) else type(exc).__name__
            log.warning("Could not send the %s notification to webhook connection %s: %s", event, conn_id, detail)
            results.append(NotificationResult("webhook", conn_id, False, detail))

    recipients = _get(spec_notifications, "email") or []
    if isinstance(recipients, str):
        recipients = [recipients]
    if recipients:
        smtp_conn_id = _get(spec_notifications, "smtp_conn_id")
        target = ", ".join(recipients)
        try:
            email_notifier(event, payload, recipients, smtp_conn_id).notify({})
            results.append(NotificationResult("email", target, True, "accepted by the SMTP server"))
        except Exception as exc:
            detail = (
                f"{type(exc).__name__}: {exc}. E-mail needs an SMTP connection "
                f"({smtp_conn_id or 'smtp_default'}, e.g. AIRFLOW_CONN_SMTP_DEFAULT) with a from_email."
            )
            log.warning("Could not send the %s e-mail to %s: %s", event, target, detail)
            results.append(NotificationResult("email", target, False, detail))
    if not results:
        log.info("No notification channel configured for %s events (spec notifications are empty).", event)
    return results


__all__ = [
    "EVENTS",
    "PAYLOAD_KEYS",
    "NotificationError",
    "NotificationResult",
    "WebhookNotifier",
    "WebhookTarget",
    "email_notifier",
    "notify",
    "payload_from_context",
    "post_webhook",
    "webhook_target_from_connection",
]
