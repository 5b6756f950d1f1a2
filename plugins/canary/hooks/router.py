"""TrafficRouterHook: the model gateway's admin and routing API (Contract 1) through an Airflow Connection.

The connection is http-like: ``host`` (or a full URL in ``host``), ``port``, ``schema`` (``http``/``https``)
and the admin token as the connection's ``password``. Optional ``extra`` JSON: ``timeout`` (seconds, default
10), ``max_retries`` (default 3), ``backoff`` (seconds, default 0.5, doubled per retry), ``verify`` (TLS).

Example, as an environment variable::

    AIRFLOW_CONN_CANARY_GATEWAY='{"conn_type": "http", "host": "127.0.0.1", "port": 8808,
                                  "password": "<admin token>"}'

The token is sent only as ``Authorization: Bearer`` and is never logged: the hook logs method and path only.
Other routers (KServe, SageMaker, Istio) can be added as other hooks with the same methods.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import requests
from airflow.sdk import BaseHook

from canary.hooks.errors import (
    GatewayAuthError,
    GatewayError,
    GatewayNotFoundError,
    GatewayUnavailableError,
    GatewayValidationError,
    RouteConflictError,
)

_RETRY_STATUS = frozenset({500, 502, 503, 504})


@dataclass(frozen=True)
class Route:
    """The gateway's route for one model (Contract 1, ``GET /v1/models/{model}/route``).

    :param model: model name.
    :param stable: the version that answers by default.
    :param canary: the candidate version, or None.
    :param canary_percent: share of units routed to the canary, 0..100.
    :param mode: ``split`` or ``shadow``.
    :param generation: incremented on every change; the compare-and-set token.
    :param lease_expires_at: ISO-8601 UTC time at which the gateway returns traffic to stable, or None.
    :param salt: the bucketing salt.
    :param updated_at: ISO-8601 UTC time of the last change (the gateway's clock).
    """

    model: str
    stable: str | None
    canary: str | None
    canary_percent: float
    mode: str
    generation: int
    lease_expires_at: str | None
    salt: str | None
    updated_at: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Route:
        """Build from the gateway's JSON answer (unknown keys are ignored)."""
        return cls(
            model=str(data["model"]),
            stable=data.get("stable"),
            canary=data.get("canary"),
            canary_percent=float(data.get("canary_percent") or 0.0),
            mode=str(data.get("mode") or "split"),
            generation=int(data.get("generation") or 0),
            lease_expires_at=data.get("lease_expires_at"),
            salt=data.get("salt"),
            updated_at=data.get("updated_at"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for XCom."""
        return asdict(self)

    def same_target(self, *, stable: str, canary: str | None, canary_percent: float, mode: str) -> bool:
        """Whether this route already sends traffic the way the given target would."""
        return (
            self.stable == stable
            and (self.canary or None) == (canary or None)
            and abs(self.canary_percent - float(canary_percent)) < 1e-9
            and self.mode == mode
        )


class TrafficRouterHook(BaseHook):
    """Read and change the traffic split of the reference model gateway.

    :param router_conn_id: Airflow connection id of the gateway (default ``canary_gateway``).
    :param timeout: per-request timeout in seconds; overrides the connection's ``extra.timeout``.
    :param max_retries: retries on connection errors and 5xx answers; overrides ``extra.max_retries``.
    :param backoff: first retry delay in seconds, doubled per retry; overrides ``extra.backoff``.
    """

    conn_name_attr = "router_conn_id"
    default_conn_name = "canary_gateway"
    conn_type = "http"
    hook_name = "Canary model gateway"

    def __init__(
        self,
        router_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff: float | None = None,
    ) -> None:
        super().__init__()
        self.router_conn_id = router_conn_id
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._session: requests.Session | None = None
        self.base_url = ""
        self.timeout = 10.0
        self.max_retries = 3
        self.backoff = 0.5

    # -- connection -----------------------------------------------------------------------------------

    def get_conn(self) -> requests.Session:
        """Build (once) a ``requests.Session`` from the Airflow Connection; the token is the password."""
        if self._session is not None:
            return self._session
        conn = self.get_connection(self.router_conn_id)
        extra = conn.extra_dejson or {}
        host = (conn.host or "").strip()
        if not host:
            raise GatewayError(
                f"connection {self.router_conn_id!r} has no host: set host (e.g. 127.0.0.1) and port of the "
                "model gateway, e.g. AIRFLOW_CONN_CANARY_GATEWAY='{\"conn_type\": \"http\", \"host\": "
                "\"127.0.0.1\", \"port\": 8808, \"password\": \"<admin token>\"}'"
            )
        if "://" in host:
            base = host.rstrip("/")
        else:
            base = f"{conn.schema or 'http'}://{host}"
            if conn.port:
                base = f"{base}:{conn.port}"
        self.base_url = base
        self.timeout = float(self._timeout if self._timeout is not None else extra.get("timeout", 10.0))
        self.max_retries = int(
            self._max_retries if self._max_retries is not None else extra.get("max_retries", 3)
        )
        self.backoff = float(self._backoff if self._backoff is not None else extra.get("backoff", 0.5))
        session = requests.Session()
        session.headers["Accept"] = "application/json"
        if conn.password:
            _mask(conn.password)
            session.headers["Authorization"] = f"Bearer {conn.password}"
        if "verify" in extra:
            session.verify = extra["verify"]
        self._session = session
        return session

    def close(self) -> None:
        """Close the underlying session (the hook can be used again afterwards)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def _request(
        self, method: str, path: str, *, json: dict[str, Any] | None = None, what: str = ""
    ) -> dict[str, Any]:
        session = self.get_conn()
        url = f"{self.base_url}{path}"
        attempts = self.max_retries + 1
        last_problem = ""
        for attempt in range(1, attempts + 1):
            try:
                resp = session.request(method, url, json=json, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code not in _RETRY_STATUS:
                    return self._answer(resp, method, path, what)
                last_problem = f"HTTP {resp.status_code}: {_detail(resp)}"
            if attempt < attempts:
                delay = self.backoff * (2 ** (attempt - 1))
                self.log.warning(
                    "gateway %s %s failed (%s); retry %d/%d in %.1fs",
                    method, path, last_problem, attempt, self.max_retries, delay,
                )
                time.sleep(delay)
        raise GatewayUnavailableError(
            f"model gateway at {self.base_url} (connection {self.router_conn_id!r}) did not answer "
            f"{method} {path} after {attempts} attempt(s): {last_problem}. Check that the gateway is running "
            "and that the connection's host and port are right."
        )

    def _answer(self, resp: requests.Response, method: str, path: str, what: str) -> dict[str, Any]:
        code = resp.status_code
        if 200 <= code < 300:
            if not resp.content:
                return {}
            return resp.json()
        detail = _detail(resp)
        where = f"{method} {path}" + (f" ({what})" if what else "")
        if code in (401, 403):
            raise GatewayAuthError(
                f"gateway refused {where}: HTTP {code} {detail}. Set the admin token as the password of "
                f"connection {self.router_conn_id!r} (the gateway's CANARY_GATEWAY_TOKEN)."
            )
        if code == 404:
            raise GatewayNotFoundError(f"gateway has no such resource for {where}: {detail}")
        if code == 409:
            raise RouteConflictError(
                f"route changed by someone else during {where}: {detail}. Nothing was changed."
            )
        if code == 422:
            raise GatewayValidationError(f"gateway rejected {where}: {detail}")
        raise GatewayError(f"gateway answered HTTP {code} to {where}: {detail}")

    # -- routes ---------------------------------------------------------------------------------------

    def get_route(self, model: str) -> Route:
        """Current route of ``model``."""
        return Route.from_dict(self._request("GET", f"/v1/models/{_seg(model)}/route"))

    def set_route(
        self,
        model: str,
        *,
        stable: str,
        canary: str | None,
        canary_percent: float,
        mode: str = "split",
        lease_seconds: int | None = None,
        if_generation: int | None = None,
    ) -> Route:
        """Set the whole route atomically (absolute, never relative).

        With ``if_generation`` this is a compare-and-set: :class:`RouteConflictError` when the route moved.
        A retried request whose first attempt was applied (answer lost) sees a 409; then the route is read
        back and accepted when it is exactly the requested one at ``if_generation + 1``.
        """
        body: dict[str, Any] = {
            "stable": stable,
            "canary": canary,
            "canary_percent": canary_percent,
            "mode": mode,
        }
        if lease_seconds is not None:
            body["lease_seconds"] = int(lease_seconds)
        if if_generation is not None:
            body["if_generation"] = int(if_generation)
        self.log.info(
            "set route of %s: stable=%s canary=%s canary_percent=%s mode=%s lease=%ss if_generation=%s",
            model, stable, canary, canary_percent, mode, lease_seconds, if_generation,
        )
        try:
            return Route.from_dict(
                self._request("PUT", f"/v1/models/{_seg(model)}/route", json=body, what="set route")
            )
        except RouteConflictError:
            if if_generation is None:
                raise
            now = self.get_route(model)
            if now.generation == if_generation + 1 and now.same_target(
                stable=stable, canary=canary, canary_percent=canary_percent, mode=mode
            ):
                self.log.info("route already at the requested target (generation %d)", now.generation)
                return now
            raise

    def renew_lease(self, model: str, *, if_generation: int, lease_seconds: int) -> Route:
        """Extend the lease without changing the generation; :class:`RouteConflictError` on mismatch."""
        return Route.from_dict(
            self._request(
                "POST",
                f"/v1/models/{_seg(model)}/route/renew",
                json={"if_generation": int(if_generation), "lease_seconds": int(lease_seconds)},
                what="renew lease",
            )
        )

    # -- registry -------------------------------------------------------------------------------------

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        """All registered versions of ``model`` with their metadata (the gateway rescans its directory)."""
        for entry in self._request("GET", "/v1/models").get("models", []):
            if entry.get("model") == model:
                return list(entry.get("versions", []))
        return []

    def list_models(self) -> list[dict[str, Any]]:
        """Every model the gateway knows, with its versions."""
        return list(self._request("GET", "/v1/models").get("models", []))

    def get_version(self, model: str, version: str) -> dict[str, Any]:
        """One version's metadata; ``loadable`` reflects an actual load attempt."""
        return self._request("GET", f"/v1/models/{_seg(model)}/versions/{_seg(version)}")

    def set_stage(self, model: str, version: str, stage: str) -> dict[str, Any]:
        """Mark ``version`` as ``production``/``candidate``/``archived`` in the registry (metadata file)."""
        return self._request(
            "PUT",
            f"/v1/models/{_seg(model)}/versions/{_seg(version)}/stage",
            json={"stage": stage},
            what="set stage",
        )

    # -- health ---------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """True when ``/healthz`` answers ok (one attempt, no retries)."""
        session = self.get_conn()
        try:
            resp = session.get(f"{self.base_url}/healthz", timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout):
            return False
        return resp.status_code == 200 and resp.json().get("status") == "ok"

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's connection test: the gateway is up and the token is accepted."""
        try:
            if not self.healthy():
                return False, f"model gateway at {self.base_url} is not healthy"
            self.list_models()
        except GatewayError as exc:
            return False, str(exc)
        return True, f"model gateway at {self.base_url} is healthy"


def _seg(name: str) -> str:
    """One URL path segment, quoted (names are validated by the spec; this is defence in depth)."""
    return quote(str(name), safe="")


def _detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def _mask(secret: str) -> None:
    """Register the admin token with Airflow's secrets masker so it never appears in task logs."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older SDKs
        return
    mask_secret(secret)
