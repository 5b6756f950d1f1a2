"""The FastAPI application of the gateway (Contract 1).

Hot paths (predict, feedback) parse JSON by hand instead of through pydantic models: the messages stay exactly as
the contract wants (the missing feature names, the bad field and its value) and the per-request cost stays low.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gateway.names import MAX_UNIT_ID_LENGTH, REQUEST_ID_PATTERN, is_valid_name
from gateway.registry import (
    STAGES,
    BadFeatures,
    LoadedModel,
    UnknownModel,
    UnknownVersion,
    UnloadableVersion,
)
from gateway.routing import RouteRequestError, assign, parse_renew_request, parse_route_request, utcnow
from gateway.service import Gateway, GatewayConfig, NoRoute, RouteConflict, RouteInvalid
from gateway.store import prediction_row

log = logging.getLogger("gateway")

MAX_BODY_BYTES = 1_000_000

# Request ids: 128 random bits from a generator seeded once from the OS. uuid4() calls os.urandom per id, which
# releases the GIL on the event loop thread and then waits to get it back behind the writer thread.
_ids = random.Random(os.urandom(32))


def new_request_id() -> str:
    """A fresh 32-hex-digit request id."""
    return f"{_ids.getrandbits(128):032x}"


def _json(status: int, payload: Any) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":"), allow_nan=False),
        status_code=status,
        media_type="application/json",
    )


def _finite(value: Any) -> Any:
    """NaN/inf become null so answers stay valid JSON (the log stores NULL for them too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPException(413, f"request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise HTTPException(422, f"request body is not valid JSON: {exc}") from None


def _check_model_name(model: str) -> None:
    if not is_valid_name(model):
        raise HTTPException(
            404, f"unknown model {model!r}: model names match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$"
        )


def create_app(config: GatewayConfig) -> FastAPI:
    """Build the app around one `Gateway`; startup/shutdown run in the lifespan (graceful flush on SIGTERM)."""
    gateway = Gateway(config)
    shadow_tasks: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(gateway.start)
        # Everything loaded so far (libraries, models) lives for the whole process: move it out of the garbage
        # collector's generations so full collections stay short on the request path.
        gc.collect()
        gc.freeze()
        lease_task = asyncio.create_task(_lease_loop())
        try:
            yield
        finally:
            lease_task.cancel()
            if shadow_tasks:
                await asyncio.gather(*shadow_tasks, return_exceptions=True)
            await run_in_threadpool(gateway.stop)

    async def _lease_loop() -> None:
        while True:
            await asyncio.sleep(config.lease_check_interval)
            try:
                await run_in_threadpool(gateway.expire_leases)
            except Exception:  # noqa: BLE001 - keep checking; a DB hiccup must not stop lease enforcement
                log.exception("lease check failed; retrying")

    app = FastAPI(title="canary model gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    def require_admin(request: Request) -> None:
        if config.admin_token is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise HTTPException(
                401,
                "admin call needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not supplied.strip():
            raise HTTPException(
                401, "Authorization header must be 'Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(supplied.strip().encode(), config.admin_token.encode()):
            raise HTTPException(403, "admin token is not valid")

    def _enqueue_row(row: dict) -> Any:
        if gateway.log.try_put_prediction(row):
            return None
        return run_in_threadpool(gateway.log.put_prediction_blocking, row)

    async def _log(row: dict) -> None:
        waiting = _enqueue_row(row)
        if waiting is not None:
            await waiting

    def _observe(model: str, version: str, arm: str, status: str, seconds: float) -> None:
        gateway.metrics.requests.labels(model, version, arm, status).inc()
        gateway.metrics.latency.labels(model, version, arm).observe(seconds)

    async def _call_model(loaded: LoadedModel, values: list[float]) -> tuple[Any, Any, float, str | None]:
        """(prediction, score, latency seconds, error text)."""
        started = time.perf_counter()
        try:
            if loaded.is_fast(config.inline_threshold_ms):
                # a sub-millisecond model costs less on the event loop than a hand-off to a worker thread
                prediction, score = loaded.predict(values)
            else:
                prediction, score = await run_in_threadpool(loaded.predict, values)
            seconds = time.perf_counter() - started
            loaded.observe(seconds)
            return prediction, score, seconds, None
        except Exception as exc:  # noqa: BLE001 - a failing model is logged as an error, never crashes the gateway
            return None, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:1000]

    async def _shadow(model: str, version: str, unit_id: str | None, features: dict, generation: int) -> None:
        request_id = new_request_id()
        ts = utcnow()
        try:
            loaded = gateway.registry.load(model, version)
            values = loaded.row(features)
        except (BadFeatures, UnknownVersion, UnloadableVersion) as exc:
            values, error = None, f"{type(exc).__name__}: {exc}"
        if values is not None:
            prediction, score, seconds, error = await _call_model(loaded, values)
        else:
            prediction, score, seconds = None, None, 0.0
        status = "ok" if error is None else "error"
        _observe(model, version, "shadow", status, seconds)
        await _log(
            prediction_row(
                request_id=request_id,
                ts=ts,
                model=model,
                version=version,
                arm="shadow",
                unit_id=unit_id,
                features=features,
                prediction=prediction,
                score=score,
                latency_ms=seconds * 1000.0,
                status=status,
                error=error,
                generation=generation,
            )
        )

    def known_model(model: str) -> None:
        """404 for a name that is not a valid model name or not in the model directory."""
        _check_model_name(model)
        if not gateway.registry.has_model(model):
            raise HTTPException(404, f"unknown model {model!r}; known models: {gateway.registry.models()}")

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def predict(request: Request) -> Response:
        model = request.path_params["model"]
        known_model(model)
        body = await _body(request)
        if not isinstance(body, dict):
            raise HTTPException(422, 'body must be a JSON object {"features": {...}, "unit_id"?: str}')
        features = body.get("features")
        if not isinstance(features, dict):
            raise HTTPException(422, f"features={features!r}: must be a JSON object {{name: number}}")
        unit_id = body.get("unit_id")
        if unit_id is not None and (
            not isinstance(unit_id, str) or not 0 < len(unit_id) <= MAX_UNIT_ID_LENGTH
        ):
            raise HTTPException(
                422, f"unit_id={unit_id!r}: must be a non-empty string of at most 256 characters"
            )
        request_id = body.get("request_id")
        if request_id is None:
            request_id = new_request_id()
        elif not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise HTTPException(
                422,
                f"request_id={request_id!r}: use 1-128 characters from letters, digits, '.', '_', ':', '-'",
            )
        elif gateway.log.known(request_id) is not None:
            raise HTTPException(409, f"request_id={request_id!r} was already used; send a new id or none")
        try:
            route = gateway.route(model)
        except NoRoute as exc:
            raise HTTPException(503, str(exc)) from None
        chosen = assign(route, unit_id)
        ts = utcnow()
        try:
            loaded = gateway.registry.load(model, chosen.version)
        except (UnknownVersion, UnloadableVersion) as exc:
            loaded, load_error = None, f"{type(exc).__name__}: {exc}"
        if loaded is not None:
            try:
                values = loaded.row(features)
            except BadFeatures as exc:
                raise HTTPException(422, f"{exc}") from None
            logged_features = {name: features[name] for name in loaded.features}
            prediction, score, seconds, error = await _call_model(loaded, values)
        else:
            logged_features, prediction, score, seconds, error = features, None, None, 0.0, load_error
        status = "ok" if error is None else "error"
        _observe(model, chosen.version, chosen.arm, status, seconds)
        await _log(
            prediction_row(
                request_id=request_id,
                ts=ts,
                model=model,
                version=chosen.version,
                arm=chosen.arm,
                unit_id=unit_id,
                features=logged_features,
                prediction=prediction,
                score=score,
                latency_ms=seconds * 1000.0,
                status=status,
                error=error,
                generation=route.generation,
            )
        )
        if chosen.shadow_version is not None:
            task = asyncio.create_task(
                _shadow(model, chosen.shadow_version, unit_id, logged_features, route.generation)
            )
            shadow_tasks.add(task)
            task.add_done_callback(shadow_tasks.discard)
        if error is not None:
            return _json(
                500,
                {
                    "detail": f"model {model} version {chosen.version} failed: {error}",
                    "request_id": request_id,
                },
            )
        return _json(
            200,
            {
                "request_id": request_id,
                "model": model,
                "version": chosen.version,
                "arm": chosen.arm,
                "prediction": _finite(prediction),
                "score": _finite(score),
            },
        )

    async def post_feedback(request: Request) -> Response:
        model = request.path_params["model"]
        _check_model_name(model)
        body = await _body(request)
        if not isinstance(body, dict):
            raise HTTPException(422, 'body must be a JSON object {"request_id": str, "label": number}')
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise HTTPException(
                422, f"request_id={request_id!r}: give the request_id the predict call returned"
            )
        label = body.get("label")
        if not isinstance(label, int | float) or isinstance(label, bool) or not math.isfinite(label):
            raise HTTPException(422, f"label={label!r}: must be a finite number (class labels as 0/1)")
        correction = body.get("correction")
        if correction is not None and (
            not isinstance(correction, int | float)
            or isinstance(correction, bool)
            or not math.isfinite(correction)
        ):
            raise HTTPException(422, f"correction={correction!r}: must be a finite number or null")
        source = body.get("source")
        if source is not None and (not isinstance(source, str) or len(source) > 128):
            raise HTTPException(422, f"source={source!r}: must be a string of at most 128 characters or null")
        owner = gateway.log.known(request_id)
        if owner is None:
            owner = await run_in_threadpool(gateway.log.lookup_model, request_id)
        if owner is None:
            raise HTTPException(
                404, f"unknown request_id {request_id!r}: no prediction with this id was logged"
            )
        if owner != model:
            raise HTTPException(404, f"request_id {request_id!r} belongs to model {owner!r}, not {model!r}")
        row = {
            "request_id": request_id,
            "ts": utcnow(),
            "label": float(label),
            "correction": None if correction is None else float(correction),
            "source": source,
        }
        await run_in_threadpool(gateway.log.put_feedback, row)
        return _json(202, {"request_id": request_id, "status": "accepted"})

    # The two hot endpoints are plain Starlette routes: FastAPI's dependency resolution costs more per request
    # than the routing and logging do, and they parse their bodies themselves anyway.
    app.router.add_route("/v1/models/{model}/predict", predict, methods=["POST"])
    app.router.add_route("/v1/models/{model}/feedback", post_feedback, methods=["POST"])

    @app.get("/v1/models/{model}/route")
    async def get_route(model: str) -> Response:
        known_model(model)
        try:
            route = await run_in_threadpool(gateway.route, model)
        except NoRoute as exc:
            raise HTTPException(503, str(exc)) from None
        return _json(200, route.to_dict())

    @app.put("/v1/models/{model}/route")
    async def put_route(model: str, request: Request) -> Response:
        require_admin(request)
        known_model(model)
        try:
            route_request = parse_route_request(await _body(request))
            route = await run_in_threadpool(gateway.set_route, model, route_request)
        except (RouteRequestError, RouteInvalid) as exc:
            raise HTTPException(422, str(exc)) from None
        except RouteConflict as exc:
            raise HTTPException(409, str(exc)) from None
        return _json(200, route.to_dict())

    @app.post("/v1/models/{model}/route/renew")
    async def renew_route(model: str, request: Request) -> Response:
        require_admin(request)
        known_model(model)
        try:
            generation, lease = parse_renew_request(await _body(request))
            route = await run_in_threadpool(gateway.renew, model, generation, lease)
        except RouteRequestError as exc:
            raise HTTPException(422, str(exc)) from None
        except RouteConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except NoRoute as exc:
            raise HTTPException(503, str(exc)) from None
        return _json(200, route.to_dict())

    def _describe_all() -> dict:
        gateway.registry.scan()
        models = []
        for model in gateway.registry.models():
            versions = []
            for entry in gateway.registry.entries(model):
                gateway.registry.try_load(model, entry.version)
                versions.append(entry.describe())
            models.append({"model": model, "versions": versions})
        return {"models": models}

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(200, await run_in_threadpool(_describe_all))

    def _describe_one(model: str, version: str) -> dict:
        gateway.registry.scan()
        entry = gateway.registry.entry(model, version)
        gateway.registry.try_load(model, version)
        return {"model": model, **entry.describe()}

    @app.get("/v1/models/{model}/versions/{version}")
    async def get_version(model: str, version: str) -> Response:
        _check_model_name(model)
        if not is_valid_name(version):
            raise HTTPException(
                404, f"unknown version {version!r}: version names match the model name pattern"
            )
        try:
            return _json(200, await run_in_threadpool(_describe_one, model, version))
        except (UnknownModel, UnknownVersion) as exc:
            raise HTTPException(404, str(exc)) from None

    @app.put("/v1/models/{model}/versions/{version}/stage")
    async def put_stage(model: str, version: str, request: Request) -> Response:
        require_admin(request)
        _check_model_name(model)
        if not is_valid_name(version):
            raise HTTPException(404, f"unknown version {version!r}")
        body = await _body(request)
        stage = body.get("stage") if isinstance(body, dict) else None
        if stage not in STAGES:
            raise HTTPException(422, f"stage={stage!r}: must be one of {list(STAGES)}")
        try:
            described = await run_in_threadpool(gateway.registry.set_stage, model, version, stage)
        except (UnknownModel, UnknownVersion) as exc:
            raise HTTPException(404, str(exc)) from None
        except UnloadableVersion as exc:
            raise HTTPException(422, str(exc)) from None
        log.info("stage of %s/%s set to %s", model, version, stage)
        return _json(200, {"model": model, **described})

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return app
