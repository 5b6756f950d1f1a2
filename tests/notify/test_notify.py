"""Notifications against real servers on loopback: an HTTP webhook and an SMTP server."""

from __future__ import annotations

import json
import logging
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from canary.notify import (
    NotificationError,
    WebhookNotifier,
    notify,
    webhook_target_from_connection,
)

SECRET = "tok-7f3c2a9e-very-secret"


class _Recorder(BaseHTTPRequestHandler):
    """Records every POST; answers with the status queued in ``server.statuses`` (200 when empty)."""

    def do_POST(self):  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.server.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def webhook_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.received = []
    server.statuses = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _conn_env(monkeypatch, conn_id: str, port: int, **extra_fields):
    conn = {
        "conn_type": "http",
        "host": "127.0.0.1",
        "port": port,
        "schema": "http",
        "password": SECRET,
        "extra": {"endpoint": "/hooks/canary", "X-Team": "ml-platform", "timeout": 3, "retries": 2},
    }
    conn.update(extra_fields)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


PAYLOAD = {
    "model": "fraud",
    "candidate": "v2",
    "stable": "v1",
    "decision": "rollback",
    "reason": "error_rate: candidate 4.1% vs stable 0.9%, harm boundary crossed",
    "run_id": "manual__2026-11-27T10:00:00",
    "report_path": "/tmp/reports/fraud/run.html",
}


def test_webhook_receives_payload_with_bearer_token_and_headers(webhook_server, monkeypatch, caplog):
    _conn_env(monkeypatch, "canary_webhook", webhook_server.server_port)
    caplog.set_level(logging.DEBUG)
    results = notify("rollback", PAYLOAD, {"webhook_conn_id": "canary_webhook", "email": []})

    assert [r.ok for r in results] == [True], results
    assert len(webhook_server.received) == 1
    got = webhook_server.received[0]
    assert got["path"] == "/hooks/canary"
    assert got["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert got["headers"]["X-Team"] == "ml-platform"
    body = json.loads(got["body"])
    for key, value in PAYLOAD.items():
        assert body[key] == value
    assert body["event"] == "rollback"
    assert body["sent_at"].endswith("+00:00")
    # The token never reaches the log, nor does the result.
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps([r.to_dict() for r in results])


def test_webhook_retries_5xx_then_succeeds(webhook_server, monkeypatch):
    webhook_server.statuses = [503, 502]
    _conn_env(monkeypatch, "canary_webhook", webhook_server.server_port)
    results = notify("promotion", {**PAYLOAD, "decision": "promote"}, {"webhook_conn_id": "canary_webhook"})
    assert results[0].ok and results[0].detail == "HTTP 200"
    assert len(webhook_server.received) == 3  # two 5xx answers, then delivered


def test_webhook_4xx_is_reported_not_raised(webhook_server, monkeypatch, caplog):
    webhook_server.statuses = [403]
    _conn_env(monkeypatch, "canary_webhook", webhook_server.server_port)
    results = notify("failure", PAYLOAD, {"webhook_conn_id": "canary_webhook"})
    assert not results[0].ok
    assert "HTTP 403" in results[0].detail
    assert len(webhook_server.received) == 1  # a 4xx is not retried
    assert SECRET not in caplog.text


def test_unreachable_webhook_does_not_leak_url_secret(monkeypatch, caplog):
    # A Slack-style URL carrying its secret in the path; nothing listens on the port.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACKISH",
        json.dumps({"conn_type": "http", "host": f"http://127.0.0.1:{port}/services/T0/B0/{SECRET}",
                    "extra": {"timeout": 1, "retries": 1}}),
    )
    results = notify("rollback", PAYLOAD, {"webhook_conn_id": "slackish"})
    assert not results[0].ok
    assert f"127.0.0.1:{port}" in results[0].detail
    assert SECRET not in results[0].detail
    assert SECRET not in caplog.text


def test_missing_connection_says_how_to_fix():
    results = notify("rollback", PAYLOAD, {"webhook_conn_id": "no_such_hook"})
    assert not results[0].ok
    assert "no_such_hook" in results[0].detail and "AIRFLOW_CONN_NO_SUCH_HOOK" in results[0].detail


def test_notifier_used_as_callback_builds_payload_from_context(webhook_server, monkeypatch):
    _conn_env(monkeypatch, "canary_webhook", webhook_server.server_port)

    class _Run:
        run_id = "manual__x"

    from airflow.sdk import DAG

    notifier = WebhookNotifier(webhook_conn_id="canary_webhook", event="failure")
    notifier({"dag_run": _Run(), "dag": DAG("canary_rollout__fraud", schedule=None), "params": {"candidate": "v3"}, "exception": ValueError("boom")})
    body = json.loads(webhook_server.received[0]["body"])
    assert body["model"] == "fraud" and body["candidate"] == "v3"
    assert body["run_id"] == "manual__x" and body["reason"] == "boom" and body["event"] == "failure"


def test_bad_connection_fields_are_named():
    class _Conn:
        conn_id = "bad"
        host = "hooks.example.com"
        schema = "ftp"
        port = None
        login = None
        password = None
        extra_dejson = {}

    with pytest.raises(NotificationError, match="schema must be http or https, got 'ftp'"):
        webhook_target_from_connection(_Conn())
    _Conn.schema, _Conn.host = "https", ""
    with pytest.raises(NotificationError, match="has no host"):
        webhook_target_from_connection(_Conn())


def test_unknown_event_is_rejected():
    with pytest.raises(ValueError, match="rollback, promotion, failure"):
        notify("promoted", PAYLOAD, {})


def test_no_channels_configured_returns_nothing():
    assert notify("promotion", PAYLOAD, {"webhook_conn_id": None, "email": []}) == []


@pytest.fixture
def smtp_server():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
        import smtpd

    messages: list[dict] = []

    class _Server(smtpd.SMTPServer):
        def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
            messages.append({"from": mailfrom, "to": rcpttos, "data": data})

    server = _Server(("127.0.0.1", 0), None, decode_data=True)
    port = server.socket.getsockname()[1]
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            asyncore.loop(timeout=0.1, count=1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield port, messages
    stop.set()
    thread.join(2)
    server.close()


def test_email_through_smtp_provider(smtp_server, monkeypatch):
    port, messages = smtp_server
    monkeypatch.setenv(
        "AIRFLOW_CONN_CANARY_SMTP",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                    "extra": {"from_email": "canary@example.com", "disable_tls": True, "disable_ssl": True,
                              "timeout": 5, "retry_limit": 0}}),
    )
    payload = {**PAYLOAD, "reason": "latency <b>{{ boom }}</b>"}
    results = notify("rollback", payload, {"email": ["oncall@example.com"], "smtp_conn_id": "canary_smtp"})
    assert [r.channel for r in results] == ["email"] and results[0].ok, results
    assert len(messages) == 1
    msg = messages[0]
    assert msg["to"] == ["oncall@example.com"]
    assert "fraud: candidate v2 rolled back" in msg["data"]
    import email

    html = next(p for p in email.message_from_string(msg["data"]).walk() if p.get_content_type() == "text/html")
    text = html.get_payload(decode=True).decode()
    assert "&lt;b&gt;" in text and "<b>" not in text  # the reason is escaped
    assert "&#123;&#123; boom }}" in text  # and not rendered as a template


def test_email_without_smtp_connection_is_reported(monkeypatch):
    results = notify("failure", PAYLOAD, {"email": ["oncall@example.com"], "smtp_conn_id": "missing_smtp"})
    assert [r.ok for r in results] == [False]
    assert "missing_smtp" in results[0].detail
