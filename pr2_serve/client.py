"""Clients of the rollout server: HTTP and gRPC, sync and async. Routes come back as numpy.

All four share one surface::

    c = HttpClient("http://127.0.0.1:8000", api_key="...")      # or GrpcClient("127.0.0.1:50051")
    res = c.generate([[1, 2, 3]], n=2, max_tokens=16, seed=0)   # GenerateResult
    res.weight_version, res.samples[0].routes.shape              # Rollout objects, as the engine
    c.push_weights(model.state_dict() | "update.safetensors", version=4)
    for ev in c.stream([[1, 2, 3]], max_tokens=16): ...          # StreamEvent objects

``AsyncHttpClient`` / ``AsyncGrpcClient`` have the same methods as coroutines (``stream`` is an
async iterator). Nothing received is unpickled: JSON, protobuf and raw little-endian arrays only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Rollout, StreamEvent
from .routes import EncodedRoutes, decode_routes

CHUNK = 4 << 20
GRPC_CHUNK = 2 << 20
#: Idle pooled HTTP connections are dropped after this long, well before the server's
#: keep-alive timeout (75 s): reusing a connection the server is closing fails the request.
KEEPALIVE_EXPIRY_S = 30.0


class ServerError(RuntimeError):
    """The server refused a request: ``status`` is the HTTP status or the gRPC code name."""

    def __init__(self, status: int | str, message: str, field: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.field = status, message, field


@dataclass(slots=True)
class GenerateResult:
    weight_version: int
    samples: list[Rollout]


def _request(prompts, **kw) -> dict:
    body = {"prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]}
    body.update({k: v for k, v in kw.items() if v is not None})
    return body


def _routes(obj: dict | None) -> np.ndarray | None:
    return None if obj is None else decode_routes(EncodedRoutes.from_json(obj))


def _rollout(s: dict) -> Rollout:
    return Rollout(
        s["prompt_index"],
        s["sample_index"],
        s["prompt_token_ids"],
        s["output_token_ids"],
        s["logprobs"],
        _routes(s.get("routes")),
        s["finish_reason"],
        s["weight_version"],
    )


def _event(e: dict) -> StreamEvent:
    routes = e.get("routes")
    return StreamEvent(
        e["prompt_index"],
        e["sample_index"],
        e.get("prompt_token_ids"),
        e["token_ids"],
        e.get("logprobs"),
        _routes(routes),
        routes["start"] if routes else 0,
        e.get("finish_reason"),
        e["weight_version"],
    )


def _raise_http(resp) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
    except Exception:
        raise ServerError(resp.status_code, resp.text[:500]) from None
    raise ServerError(resp.status_code, err.get("message", ""), err.get("field"))


def _weights_file(weights: Mapping[str, Any] | str | os.PathLike) -> tuple[Path, bool]:
    """A safetensors file for ``weights`` (written to a temp file for a state dict)."""
    if isinstance(weights, (str, os.PathLike)):
        return Path(weights), False
    from safetensors.torch import save_file

    fd, name = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, name)
    return Path(name), True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _file_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


# -- HTTP -----------------------------------------------------------------------------------------
def _httpx_options(base_url: str, timeout: float) -> dict:
    import httpx

    return {
        "base_url": base_url,
        "timeout": timeout,
        "limits": httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
    }


def _push_headers(path: Path, api_key: str | None) -> dict[str, str]:
    """Headers of ``PUT /v1/weights/{version}`` for the safetensors file at ``path``."""
    headers = {
        "X-Content-SHA256": _sha256(path),
        "Content-Length": str(path.stat().st_size),
        "Content-Type": "application/octet-stream",
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class HttpClient:
    """Synchronous HTTP client (httpx)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.api_key = api_key
        self._http = httpx.Client(**_httpx_options(base_url, timeout))
        # the connection dropped before any response: safe to re-send once
        self._retryable = (httpx.RemoteProtocolError, httpx.ConnectError)

    def info(self) -> dict:
        r = self._http.get("/v1/info")
        _raise_http(r)
        return r.json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except Exception:
            return False

    def generate(self, prompts, **sampling) -> GenerateResult:
        body = _request(prompts, **sampling)
        try:
            r = self._http.post("/v1/generate", json=body)
        except self._retryable:  # connection dropped before a response: safe to send again
            r = self._http.post("/v1/generate", json=body)
        _raise_http(r)
        body = r.json()
        return GenerateResult(body["weight_version"], [_rollout(s) for s in body["samples"]])

    def stream(self, prompts, **sampling) -> Iterator[StreamEvent]:
        with self._http.stream(
            "POST", "/v1/generate/stream", json=_request(prompts, **sampling)
        ) as r:
            if r.status_code >= 400:
                r.read()
                _raise_http(r)
            for line in r.iter_lines():
                if not line:
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    raise ServerError("stream", obj["error"]["message"])
                if obj.get("end"):
                    return
                yield _event(obj)

    def push_weights(self, weights, version: int) -> dict:
        path, temp = _weights_file(weights)
        try:
            headers = _push_headers(path, self.api_key)
            url = f"/v1/weights/{version}"
            try:
                r = self._http.put(url, content=_file_chunks(path), headers=headers)
            except self._retryable:
                # no response: committed only if the server now serves that version
                if self.info()["weight_version"] == version:
                    return {"weight_version": version}
                r = self._http.put(url, content=_file_chunks(path), headers=headers)
            _raise_http(r)
            return r.json()
        finally:
            if temp:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self._http.close()


class AsyncHttpClient:
    """Asynchronous HTTP client (httpx)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.api_key = api_key
        self._http = httpx.AsyncClient(**_httpx_options(base_url, timeout))
        # the connection dropped before any response: safe to re-send once
        self._retryable = (httpx.RemoteProtocolError, httpx.ConnectError)

    async def info(self) -> dict:
        r = await self._http.get("/v1/info")
        _raise_http(r)
        return r.json()

    async def generate(self, prompts, **sampling) -> GenerateResult:
        body = _request(prompts, **sampling)
        try:
            r = await self._http.post("/v1/generate", json=body)
        except self._retryable:  # connection dropped before a response: safe to send again
            r = await self._http.post("/v1/generate", json=body)
        _raise_http(r)
        body = r.json()
        return GenerateResult(body["weight_version"], [_rollout(s) for s in body["samples"]])

    async def stream(self, prompts, **sampling) -> AsyncIterator[StreamEvent]:
        async with self._http.stream(
            "POST", "/v1/generate/stream", json=_request(prompts, **sampling)
        ) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise_http(r)
            async for line in r.aiter_lines():
                if not line:
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    raise ServerError("stream", obj["error"]["message"])
                if obj.get("end"):
                    return
                yield _event(obj)

    async def push_weights(self, weights, version: int) -> dict:
        path, temp = _weights_file(weights)
        try:

            async def body():
                for block in _file_chunks(path):
                    yield block

            headers = _push_headers(path, self.api_key)
            url = f"/v1/weights/{version}"
            try:
                r = await self._http.put(url, content=body(), headers=headers)
            except self._retryable:
                # no response: committed only if the server now serves that version
                if (await self.info())["weight_version"] == version:
                    return {"weight_version": version}
                r = await self._http.put(url, content=body(), headers=headers)
            _raise_http(r)
            return r.json()
        finally:
            if temp:
                path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        await self._http.aclose()


# -- gRPC -----------------------------------------------------------------------------------------
def _grpc_request(
    pb2,
    prompts,
    n=None,
    temperature=None,
    top_p=None,
    top_k=None,
    max_tokens=None,
    seed=None,
    stop_token_ids=(),
    return_logprobs=True,
    return_routes=True,
    routes_from=0,
    min_weight_version=0,
    stream=False,
):
    msg = pb2.GenerateRequest(
        n=n or 0,
        top_p=top_p or 0.0,
        top_k=top_k or 0,
        max_tokens=max_tokens or 0,
        stop_token_ids=list(stop_token_ids or ()),
        skip_logprobs=not return_logprobs,
        skip_routes=not return_routes,
        routes_from=routes_from,
        min_weight_version=min_weight_version,
        stream=stream,
    )
    if temperature is not None:
        msg.temperature, msg.has_temperature = temperature, True
    if seed is not None:
        msg.seed = seed
    for p in prompts:
        if isinstance(p, str):
            msg.prompts.add(text=p)
        else:
            msg.prompts.add().token_ids.ids.extend(int(t) for t in p)
    return msg


def _grpc_routes(r) -> np.ndarray | None:
    if not r.dtype:
        return None
    return decode_routes(EncodedRoutes(r.dtype, tuple(r.shape), r.data))


def _grpc_rollout(m) -> Rollout:
    return Rollout(
        m.prompt_index,
        m.sample_index,
        list(m.prompt_token_ids),
        list(m.output_token_ids),
        list(m.logprobs),
        _grpc_routes(m.routes),
        m.finish_reason,
        m.weight_version,
    )


def _grpc_event(m) -> StreamEvent:
    return StreamEvent(
        m.prompt_index,
        m.sample_index,
        list(m.prompt_token_ids) or None,
        list(m.output_token_ids),
        list(m.logprobs),
        _grpc_routes(m.routes),
        m.routes.start,
        m.finish_reason or None,
        m.weight_version,
    )


def _grpc_error(e) -> ServerError:
    return ServerError(e.code().name, e.details())


def _upload_messages(pb2, path: Path, version: int) -> Iterator:
    yield pb2.UpdateWeightsRequest(
        header=pb2.UpdateWeightsHeader(
            version=version, sha256=_sha256(path), total_size=path.stat().st_size
        )
    )
    for block in _file_chunks(path, GRPC_CHUNK):
        yield pb2.UpdateWeightsRequest(chunk=block)


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


class GrpcClient:
    """Synchronous gRPC client."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 600.0):
        import grpc

        from .api.proto import load

        self._pb2, pb2_grpc = load()
        self._grpc = grpc
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb2_grpc.RolloutStub(self._channel)
        self.api_key, self.timeout = api_key, timeout

    def info(self) -> dict:
        try:
            m = self._stub.GetInfo(self._pb2.GetInfoRequest(), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}

    def generate(self, prompts, **sampling) -> GenerateResult:
        samples, version = [], 0
        try:
            for m in self._stub.Generate(
                _grpc_request(self._pb2, prompts, **sampling), timeout=self.timeout
            ):
                if m.end:
                    version = m.weight_version
                    break
                samples.append(_grpc_rollout(m))
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        if samples:
            version = samples[0].weight_version
        return GenerateResult(version, samples)

    def stream(self, prompts, **sampling) -> Iterator[StreamEvent]:
        try:
            for m in self._stub.Generate(
                _grpc_request(self._pb2, prompts, stream=True, **sampling), timeout=self.timeout
            ):
                if m.end:
                    return
                yield _grpc_event(m)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None

    def push_weights(self, weights, version: int) -> dict:
        path, temp = _weights_file(weights)
        meta = _auth_metadata(self.api_key)
        try:
            res = self._stub.UpdateWeights(
                _upload_messages(self._pb2, path, version), metadata=meta, timeout=self.timeout
            )
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        finally:
            if temp:
                path.unlink(missing_ok=True)
        return _push_result(res)

    def close(self) -> None:
        self._channel.close()


def _auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def _push_result(res) -> dict:
    """An ``UpdateWeightsResponse`` as the dict the HTTP clients return."""
    return {
        "weight_version": res.weight_version,
        "num_tensors": res.num_tensors,
        "seconds": res.seconds,
        "receive_seconds": res.receive_seconds,
        "apply_seconds": res.apply_seconds,
    }


class AsyncGrpcClient:
    """Asynchronous gRPC client (grpc.aio)."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 600.0):
        import grpc

        from .api.proto import load

        self._pb2, pb2_grpc = load()
        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb2_grpc.RolloutStub(self._channel)
        self.api_key, self.timeout = api_key, timeout

    async def generate(self, prompts, **sampling) -> GenerateResult:
        samples, version = [], 0
        try:
            async for m in self._stub.Generate(
                _grpc_request(self._pb2, prompts, **sampling), timeout=self.timeout
            ):
                if m.end:
                    version = m.weight_version
                    break
                samples.append(_grpc_rollout(m))
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        if samples:
            version = samples[0].weight_version
        return GenerateResult(version, samples)

    async def stream(self, prompts, **sampling) -> AsyncIterator[StreamEvent]:
        try:
            async for m in self._stub.Generate(
                _grpc_request(self._pb2, prompts, stream=True, **sampling), timeout=self.timeout
            ):
                if m.end:
                    return
                yield _grpc_event(m)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None

    async def push_weights(self, weights, version: int) -> dict:
        path, temp = _weights_file(weights)
        meta = _auth_metadata(self.api_key)
        try:
            res = await self._stub.UpdateWeights(
                _upload_messages(self._pb2, path, version), metadata=meta, timeout=self.timeout
            )
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        finally:
            if temp:
                path.unlink(missing_ok=True)
        return _push_result(res)

    async def aclose(self) -> None:
        await self._channel.close()
