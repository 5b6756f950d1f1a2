"""The gateway's state and operations, independent of HTTP: routes, leases, the registry and the log.

`Gateway` is what the FastAPI app (gateway.app) calls. Route changes are serialised by one lock and written to the
`routes` table with a compare-and-set on the generation before they take effect, so a restart keeps the route and
a change is never half applied.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from gateway.metrics import GatewayMetrics
from gateway.registry import ModelRegistry, UnknownVersion, UnloadableVersion
from gateway.routing import Route, RouteRequest, utcnow
from gateway.store import PredictionLog, RouteStore, create_schema, make_engine

log = logging.getLogger("gateway")


class RouteConflict(RuntimeError):
    """The route's generation is not the one the caller expected (HTTP 409)."""


class RouteInvalid(ValueError):
    """The route names a version that does not exist or does not load (HTTP 422)."""


class NoRoute(LookupError):
    """The model has no stored route and no version in stage `production` to start one (HTTP 503)."""


@dataclass
class GatewayConfig:
    """How the gateway runs.

    :param model_dir: the model directory (`<model>/<version>/model.joblib` + `metadata.json`).
    :param db_url: SQLAlchemy URL of the prediction log, e.g. `sqlite:///var/predictions.db`.
    :param admin_token: bearer token for admin calls; None only with `--insecure-no-token`.
    :param log_predictions: False disables writing predictions (the benchmark's no-logging baseline).
    :param lease_check_interval: seconds between background lease checks (each request also checks).
    :param batch_size: most rows per log transaction.
    :param max_queue: log queue bound (back-pressure beyond it).
    :param flush_interval: longest wait, seconds, before a partial batch is written.
    :param inline_threshold_ms: models whose calls average less than this run on the event loop (no thread
        hand-off); slower ones run in the worker thread pool so they cannot stall other requests. 0 disables.
    :param spill_path: file for rows the database still refuses at shutdown.
    """

    model_dir: Path
    db_url: str
    admin_token: str | None
    log_predictions: bool = True
    lease_check_interval: float = 0.25
    batch_size: int = 500
    max_queue: int = 50_000
    flush_interval: float = 0.05
    inline_threshold_ms: float = 1.0
    spill_path: Path | None = None


@dataclass
class Gateway:
    """Routes, registry and prediction log of one gateway process."""

    config: GatewayConfig
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    _routes: dict[str, Route] = field(default_factory=dict, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)

    def __post_init__(self) -> None:
        self.registry = ModelRegistry(Path(self.config.model_dir))
        self.engine = make_engine(self.config.db_url)
        self.route_store = RouteStore(self.engine)
        self.log = PredictionLog(
            self.engine,
            enabled=self.config.log_predictions,
            batch_size=self.config.batch_size,
            max_queue=self.config.max_queue,
            flush_interval=self.config.flush_interval,
            spill_path=self.config.spill_path,
            on_written=self.metrics.rows_written.inc,
        )

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Create (or extend) the schema, scan the model directory, restore or create routes, start the log writer."""
        create_schema(self.engine, row_columns=True)
        self.registry.scan()
        with self._lock:
            self._routes = self.route_store.load_all()
            for model in self.registry.models():
                try:
                    self._route_locked(model)
                except NoRoute as exc:
                    log.warning("%s", exc)
            for route in self._routes.values():
                self.metrics.canary_percent.labels(route.model).set(route.canary_percent)
                for version in (route.stable, route.canary):
                    if version is not None and self.registry.has_model(route.model):
                        try:
                            self.registry.load(route.model, version)
                        except (UnknownVersion, UnloadableVersion) as exc:
                            log.error(
                                "route of %s names version %s that cannot serve: %s",
                                route.model,
                                version,
                                exc,
                            )
        self.expire_leases()
        self.log.start()
        log.info(
            "gateway started: models=%s log=%s logging=%s",
            self.registry.models(),
            self.engine.url.render_as_string(hide_password=True),
            self.config.log_predictions,
        )

    def stop(self) -> None:
        """Flush the prediction log (every accepted row) and release the database."""
        self.log.stop()
        self.engine.dispose()
        log.info("gateway stopped: %d prediction rows written", self.log.rows_written)

    # -- routes -----------------------------------------------------------------------------------------------
    def route(self, model: str) -> Route:
        """The current route of `model`, after enforcing its lease."""
        with self._lock:
            route = self._route_locked(model)
            if route.lease_expired(utcnow()):
                route = self._expire_locked(route)
            return route

    def _route_locked(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is not None:
            return route
        stable = self.registry.production_version(model)
        if stable is None:
            raise NoRoute(
                f"model {model!r} has no route yet and no version in stage 'production': set one with "
                f"PUT /v1/models/{model}/versions/<version>/stage or PUT /v1/models/{model}/route"
            )
        now = utcnow()
        route = Route(model, stable, None, 0.0, "split", 1, None, secrets.token_hex(8), now)
        if not self.route_store.insert(route):
            route = self.route_store.load_all()[model]
        self._routes[model] = route
        self.metrics.canary_percent.labels(model).set(route.canary_percent)
        return route

    def expire_leases(self) -> list[Route]:
        """Return every canary whose lease ran out to 0 % (background check); the changed routes."""
        now = utcnow()
        changed = []
        with self._lock:
            for route in list(self._routes.values()):
                if route.lease_expired(now):
                    changed.append(self._expire_locked(route))
        return changed

    def _expire_locked(self, route: Route) -> Route:
        new = route.expired(utcnow())
        try:
            if not self.route_store.replace(new, route.generation):
                stored = self.route_store.load_all().get(route.model)
                if stored is not None and not stored.lease_expired(utcnow()):
                    self._routes[route.model] = stored  # another writer renewed or replaced it: adopt theirs
                    return stored
                new = route.expired(utcnow()) if stored is None else stored.expired(utcnow())
                self.route_store.replace(new, new.generation - 1)
        except Exception:  # noqa: BLE001 - the database is down: still take the traffic back, in memory
            log.exception(
                "could not store the lease expiry of model %s; traffic returns to stable in this process anyway "
                "(a restart expires the stored lease again)", route.model,
            )
        self._routes[route.model] = new
        self.metrics.lease_expirations.labels(route.model).inc()
        self.metrics.canary_percent.labels(route.model).set(0.0)
        log.warning(
            "lease of model %s expired at %s without renewal: canary %s returned to 0%%, all traffic to stable %s "
            "(generation %d -> %d)",
            route.model,
            route.lease_expires_at,
            route.canary,
            route.stable,
            route.generation,
            new.generation,
        )
        return new

    def set_route(self, model: str, request: RouteRequest) -> Route:
        """Replace the whole route atomically; raise `RouteConflict` (409) or `RouteInvalid` (422)."""
        for role, version in (("stable", request.stable), ("canary", request.canary)):
            if version is None:
                continue
            try:
                self.registry.load(model, version)
            except UnknownVersion as exc:
                raise RouteInvalid(f"{role}={version!r}: {exc}") from exc
            except UnloadableVersion as exc:
                raise RouteInvalid(
                    f"{role}={version!r} cannot be loaded, fix or re-register it: {exc}"
                ) from exc
        with self._lock:
            try:
                current: Route | None = self.route(model)
            except NoRoute:
                current = None
            if request.if_generation is not None:
                have = current.generation if current is not None else 0
                if request.if_generation != have:
                    raise RouteConflict(
                        f"if_generation={request.if_generation} but the route of {model!r} is at generation {have}; "
                        "read the route again and decide on the current state"
                    )
            now = utcnow()
            gives_traffic = request.canary is not None and (
                request.canary_percent > 0 or request.mode == "shadow"
            )
            lease = (
                now + timedelta(seconds=request.lease_seconds)
                if gives_traffic and request.lease_seconds is not None
                else None
            )
            new = Route(
                model=model,
                stable=request.stable,
                canary=request.canary,
                canary_percent=request.canary_percent,
                mode=request.mode,
                generation=(current.generation if current else 0) + 1,
                lease_expires_at=lease,
                salt=current.salt if current else secrets.token_hex(8),
                updated_at=now,
            )
            stored = (
                self.route_store.replace(new, current.generation)
                if current is not None
                else self.route_store.insert(new)
            )
            if not stored:
                fresh = self.route_store.load_all().get(model)
                if fresh is not None:
                    self._routes[model] = fresh
                raise RouteConflict(
                    f"the route of {model!r} was changed concurrently; read it again and retry"
                )
            self._routes[model] = new
            self.metrics.canary_percent.labels(model).set(new.canary_percent)
            log.info(
                "route of %s set: stable=%s canary=%s percent=%s mode=%s generation=%d lease_expires_at=%s",
                model,
                new.stable,
                new.canary,
                new.canary_percent,
                new.mode,
                new.generation,
                new.lease_expires_at,
            )
            return new

    def renew(self, model: str, if_generation: int, lease_seconds: int) -> Route:
        """Extend the lease of the current route without changing its generation; 409 on mismatch."""
        with self._lock:
            current = self.route(model)
            if if_generation != current.generation:
                raise RouteConflict(
                    f"if_generation={if_generation} but the route of {model!r} is at generation "
                    f"{current.generation} (the lease may have expired); read the route again"
                )
            if current.lease_expires_at is None:
                raise RouteConflict(
                    f"the route of {model!r} has no lease to renew (the canary has no traffic)"
                )
            new = current.renewed(lease_seconds, utcnow())
            if not self.route_store.replace(new, current.generation):
                raise RouteConflict(f"the route of {model!r} was changed concurrently; read it again")
            self._routes[model] = new
            return new
