"""TrafficRouterHook against the real gateway on loopback (and a tiny flaky server for the retry path)."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from canary.hooks.errors import (
    GatewayAuthError,
    GatewayNotFoundError,
    GatewayUnavailableError,
    GatewayValidationError,
    RouteConflictError,
)
from canary.hooks.router import TrafficRouterHook


def test_route_compare_and_set_lease_and_retry_of_an_applied_change(router_conn):
    hook = TrafficRouterHook(router_conn)
    route = hook.get_route("fraud")
    assert route.stable == "v1" and route.canary_percent == 0
    g = route.generation

    moved = hook.set_route("fraud", stable="v1", canary="v2", canary_percent=5, lease_seconds=60, if_generation=g)
    assert (moved.generation, moved.canary, moved.canary_percent) == (g + 1, "v2", 5.0)
    assert moved.lease_expires_at is not None and moved.updated_at is not None

    # The same request again (a retry whose first answer was lost): 409 at the gateway, but the route is exactly
    # the requested one at if_generation + 1, so the hook returns it instead of failing or stepping twice.
    again = hook.set_route("fraud", stable="v1", canary="v2", canary_percent=5, lease_seconds=60, if_generation=g)
    assert again.generation == g + 1 and again.updated_at == moved.updated_at

    # A different change based on the stale generation is a real conflict; nothing changes.
    with pytest.raises(RouteConflictError, match="Nothing was changed"):
        hook.set_route("fraud", stable="v1", canary="v2", canary_percent=25, lease_seconds=60, if_generation=g)
    assert hook.get_route("fraud").canary_percent == 5

    time.sleep(1.1)
    renewed = hook.renew_lease("fraud", if_generation=g + 1, lease_seconds=120)
    assert renewed.generation == g + 1
    assert renewed.lease_expires_at > moved.lease_expires_at
    with pytest.raises(RouteConflictError):
        hook.renew_lease("fraud", if_generation=g, lease_seconds=120)


def test_lease_expiry_returns_traffic_to_stable(router_conn):
    hook = TrafficRouterHook(router_conn)
    g = hook.get_route("fraud").generation
    hook.set_route("fraud", stable="v1", canary="v2", canary_percent=50, lease_seconds=1, if_generation=g)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and hook.get_route("fraud").canary_percent > 0:
        time.sleep(0.2)
    route = hook.get_route("fraud")
    assert route.canary_percent == 0 and route.stable == "v1" and route.generation == g + 2


def test_registry_versions_and_stage(router_conn):
    hook = TrafficRouterHook(router_conn)
    versions = {v["version"]: v for v in hook.list_versions("fraud")}
    assert {"v1", "v2", "v3", "v4"} <= set(versions)
    assert versions["v1"]["stage"] == "production"
    v2 = hook.get_version("fraud", "v2")
    assert v2["loadable"] is True and "auc" in v2["eval_metrics"]
    hook.set_stage("fraud", "v2", "production")
    assert hook.get_version("fraud", "v2")["stage"] == "production"
    assert hook.get_version("fraud", "v1")["stage"] == "archived"
    with pytest.raises(GatewayNotFoundError):
        hook.get_version("fraud", "v99")
    assert hook.list_versions("no-such-model") == []


def test_bad_values_and_bad_token_are_clear_errors(router_conn, gateway, set_conn):
    hook = TrafficRouterHook(router_conn)
    g = hook.get_route("fraud").generation
    with pytest.raises(GatewayValidationError, match="gateway rejected"):
        hook.set_route("fraud", stable="v1", canary="v77", canary_percent=5, lease_seconds=60, if_generation=g)
    with pytest.raises(GatewayValidationError):
        hook.set_route("fraud", stable="v1", canary="v2", canary_percent=5, if_generation=g)  # no lease
    assert hook.get_route("fraud").generation == g  # nothing half-applied

    set_conn("canary_test_badtoken", conn_type="http", host="127.0.0.1", port=int(gateway.url.rsplit(":", 1)[1]),
             password="wrong-token")
    bad = TrafficRouterHook("canary_test_badtoken")
    with pytest.raises(GatewayAuthError, match="password of connection 'canary_test_badtoken'"):
        bad.set_route("fraud", stable="v1", canary="v2", canary_percent=5, lease_seconds=60, if_generation=g)
    assert bad.test_connection()[0] is True  # reading works without the admin token
    ok, message = hook.test_connection()
    assert ok and "healthy" in message


def test_token_never_logged(router_conn, gateway, caplog):
    caplog.set_level(logging.DEBUG)
    hook = TrafficRouterHook(router_conn)
    g = hook.get_route("fraud").generation
    hook.set_route("fraud", stable="v1", canary="v2", canary_percent=1, lease_seconds=30, if_generation=g)
    with pytest.raises(RouteConflictError):
        hook.set_route("fraud", stable="v1", canary="v2", canary_percent=9, lease_seconds=30, if_generation=g)
    assert caplog.records, "the hook logs its route changes"
    assert gateway.token not in caplog.text


def test_unreachable_gateway_retries_with_backoff_then_says_so(set_conn):
    from gateway.testing import free_port

    port = free_port()  # nothing listens there
    set_conn("canary_test_down", conn_type="http", host="127.0.0.1", port=port, password="t",
             extra={"timeout": 1, "max_retries": 2, "backoff": 0.2})
    hook = TrafficRouterHook("canary_test_down")
    t0 = time.monotonic()
    with pytest.raises(GatewayUnavailableError, match=r"after 3 attempt\(s\)"):
        hook.get_route("fraud")
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s
    assert hook.healthy() is False
    assert hook.test_connection()[0] is False


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first two requests, then a route."""

    calls = 0

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).calls += 1
        if type(self).calls <= 2:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"detail": "warming up"}')
            return
        body = (b'{"model": "fraud", "stable": "v1", "canary": null, "canary_percent": 0, "mode": "split", '
                b'"generation": 7, "lease_expires_at": null, "salt": "s", "updated_at": "2026-01-01T00:00:00Z"}')
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


def test_5xx_is_retried(set_conn):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        set_conn("canary_test_flaky", conn_type="http", host=f"http://127.0.0.1:{server.server_address[1]}",
                 extra={"max_retries": 3, "backoff": 0.01})
        route = TrafficRouterHook("canary_test_flaky").get_route("fraud")
        assert route.generation == 7 and _Flaky.calls == 3
    finally:
        server.shutdown()
