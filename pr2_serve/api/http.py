"""HTTP API (FastAPI): thin over :class:`RolloutService`. OpenAPI at ``/openapi.json``."""

from __future__ import annotations

import json

from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Rollout, StreamEvent
from ..routes import encode_routes
from .schemas import (
    ApiError,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Info,
    WeightsResponse,
)
from .service import RolloutService

ERRORS = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 409, 411, 413, 422, 429, 500, 503, 507)
}


def routes_json(routes, start: int) -> tuple[dict, int]:
    enc = encode_routes(routes, start)
    return {**enc.to_json(), "start": min(start, len(routes))}, len(enc.data)


def sample_json(r: Rollout, routes_from: int) -> tuple[dict, int]:
    body = {
        "prompt_index": r.prompt_index,
        "sample_index": r.sample_index,
        "prompt_token_ids": r.prompt_token_ids,
        "output_token_ids": r.output_token_ids,
        "logprobs": r.logprobs,
        "finish_reason": r.finish_reason,
        "weight_version": r.weight_version,
        "routes": None,
    }
    nbytes = 0
    if r.routes is not None:
        body["routes"], nbytes = routes_json(r.routes, routes_from)
    return body, nbytes


def event_json(ev: StreamEvent, routes_from: int) -> tuple[dict, int]:
    body: dict = {
        "prompt_index": ev.prompt_index,
        "sample_index": ev.sample_index,
        "token_ids": ev.token_ids,
        "logprobs": ev.logprobs,
        "weight_version": ev.weight_version,
    }
    if ev.prompt_token_ids is not None:
        body["prompt_token_ids"] = ev.prompt_token_ids
    nbytes = 0
    if ev.routes is not None:
        skip = max(0, routes_from - ev.routes_start)
        body["routes"], nbytes = routes_json(ev.routes, skip)
        body["routes"]["start"] = ev.routes_start + min(skip, len(ev.routes))
    if ev.finish_reason is not None:
        body["finish_reason"] = ev.finish_reason
    return body, nbytes


def create_app(service: RolloutService) -> FastAPI:
    app = FastAPI(
        title="pr2 rollout server",
        version="1",
        description="Rollouts with per-token MoE routes; versioned weight pushes.",
    )
    limits = service.limits
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        metrics.errors.labels(kind=e.kind).inc()
        return JSONResponse(e.to_json(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        """Framework errors (unparsable body, unknown route, wrong method) in our error shape."""
        kind = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code, "http_error"
        )
        metrics.errors.labels(kind=kind).inc()
        return JSONResponse(
            {"error": {"type": kind, "message": str(e.detail)}},
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = loc[0] + "".join(f"[{x}]" for x in loc[1:]) if loc else None
        kind = "invalid_argument"
        if first.get("type") == "json_invalid":
            kind, field = "malformed_json", None
            msg = f"malformed JSON body at byte {loc[0] if loc else '?'}"
        else:
            msg = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        metrics.errors.labels(kind=kind).inc()
        body = {"error": {"type": kind, "message": msg}}
        if field:
            body["error"]["field"] = field
        return JSONResponse(body, status_code=400 if kind == "malformed_json" else 422)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        """Refuse oversize bodies from their Content-Length, before reading them."""
        if request.method in ("POST", "PUT"):
            upload = request.url.path.startswith("/v1/weights/")
            limit = limits.max_upload_bytes if upload else limits.max_request_bytes
            length = request.headers.get("content-length")
            if length is None and not upload:
                return JSONResponse(
                    ApiError(411, "length_required", "Content-Length required").to_json(),
                    status_code=411,
                )
            if length is not None and (not length.isdigit() or int(length) > limit):
                metrics.errors.labels(kind="too_large").inc()
                return JSONResponse(
                    ApiError(
                        413,
                        "resource_exhausted",
                        f"body of {length} bytes exceeds the limit {limit}",
                    ).to_json(),
                    status_code=413,
                )
        return await call_next(request)

    @app.get("/healthz", summary="Liveness", responses=ERRORS)
    async def healthz():
        """Always ``{"status": "ok"}`` while the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness", responses=ERRORS)
    async def readyz():
        """200 ``{"status": "ready", "weight_version": 3}`` once the engine has loaded and
        answered a warm-up request; 503 before (or if the engine failed)."""
        if service.ready and service.engine is not None and service.engine.healthy():
            return {"status": "ready", "weight_version": service.engine.weight_version}
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/v1/info", response_model=Info, responses=ERRORS)
    async def info():
        """Model facts and the weight version being served (see :class:`Info`)."""
        if service.engine is None:
            raise ApiError(503, "unavailable", "the model is still loading")
        i = service.engine.info
        return Info(
            model=i.model,
            architecture=i.architecture,
            num_moe_layers=i.num_moe_layers,
            num_experts=i.num_experts,
            top_k=i.top_k,
            weight_version=service.engine.weight_version,
            predictor=service.engine.plugin,
            route_dtype=i.route_dtype,
            max_model_len=i.max_model_len,
            vocab_size=i.vocab_size,
        )

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(
        req: GenerateRequest, x_pr2_fault: str | None = Header(None, include_in_schema=False)
    ):
        """Generate ``n`` samples per prompt with log-probs and routes.

        Request: ``{"prompts": [[1, 2, 3]], "n": 2, "max_tokens": 8, "seed": 0}``.
        Response: ``{"weight_version": 0, "samples": [{"prompt_index": 0, "sample_index": 0,
        "prompt_token_ids": [1, 2, 3], "output_token_ids": [...8 ids], "logprobs": [...],
        "finish_reason": "length", "weight_version": 0, "routes": {"dtype": "uint8",
        "shape": [10, 4, 2], "data": "<base64>", "start": 0}}, ...]}``
        """
        rollouts = await service.generate(req, "http", fault=x_pr2_fault)
        samples, nbytes = [], 0
        for r in rollouts:
            body, n = sample_json(r, req.routes_from)
            samples.append(body)
            nbytes += n
        metrics.route_bytes.labels(protocol="http").inc(nbytes)
        version = rollouts[0].weight_version if rollouts else service.engine.weight_version
        return JSONResponse({"weight_version": version, "samples": samples})

    @app.post("/v1/generate/stream", responses=ERRORS, response_class=StreamingResponse)
    async def generate_stream(req: GenerateRequest):
        """The same request as ``/v1/generate``; newline-delimited JSON events.

        Events: ``{"prompt_index": 0, "sample_index": 1, "token_ids": [42], "logprobs": [-0.7],
        "routes": {"dtype": "uint8", "shape": [1, 4, 2], "data": "...", "start": 5},
        "weight_version": 0}`` (``prompt_token_ids`` on a sample's first event,
        ``finish_reason`` on its last), then ``{"end": true}``.
        """
        events = service.stream(req, "http")
        first = await anext(events, None)  # surface validation errors as a 4xx, not mid-stream

        async def body():
            nbytes = 0
            ev = first
            try:
                while ev is not None:
                    obj, n = event_json(ev, req.routes_from)
                    nbytes += n
                    yield json.dumps(obj) + "\n"
                    ev = await anext(events, None)
                yield json.dumps({"end": True}) + "\n"
            except ApiError as e:
                yield json.dumps({**e.to_json(), "end": True}) + "\n"
            finally:
                metrics.route_bytes.labels(protocol="http").inc(nbytes)

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.put(
        "/v1/weights/{version}",
        response_model=WeightsResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def put_weights(
        request: Request,
        version: int = Path(ge=1, le=(1 << 63) - 1),
        authorization: str | None = Header(None),
        x_content_sha256: str | None = Header(None),
    ):
        """Push a safetensors file (any subset of policy and predictor tensors, HF names).

        Headers: ``Authorization: Bearer <key>``, ``X-Content-SHA256: <hex>``. The body is
        streamed to disk; checksum, names, shapes and dtypes are verified before anything
        changes; running requests finish on the old version. Response:
        ``{"weight_version": 4, "num_tensors": 139, "seconds": 0.31}``.
        """
        service.check_auth(authorization)
        length = request.headers.get("content-length")
        return await service.push_weights(
            version,
            request.stream(),
            x_content_sha256,
            int(length) if length is not None else None,
            "http",
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_route():
        """Prometheus text format: requests, tokens, latency, route bytes, weight version,
        weight updates and their duration, errors by kind."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
