"""The rollout service behind both protocols: lifecycle, auth, generate, stream, weight pushes.

Protocol layers (``http.py``, ``grpc_server.py``) only translate; every rule lives once below
them:

- **Generate:** a :class:`GenerateRequest` is admitted (ready, healthy, not too many in
  flight), checked against the model and the limits (:mod:`.validate`, errors naming the
  field), then submitted to the engine thread; engine errors map through :mod:`.errors`.
- **Weight push:** the upload is streamed to disk, hashed and size-limited by the
  :class:`WeightStore`, checked by the engine (every tensor's name, shape, dtype) and only then
  applied between steps; the store records the committed version, so a restarted server comes
  back serving it. A failed push leaves no file and no change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ..checkpoint import require_newer
from ..types import Rollout, Sampling, StreamEvent
from .config import Limits
from .errors import ENGINE_ERRORS, ApiError, from_engine
from .metrics import Metrics
from .schemas import GenerateRequest
from .validate import validate
from .weight_store import WeightStore

if TYPE_CHECKING:
    from ..engine import RolloutEngine

__all__ = ["RolloutService"]


class RolloutService:
    """One engine behind HTTP and gRPC (see module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        state_dir: str | os.PathLike,
        api_key: str | None,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.store = WeightStore(state_dir, self.limits.max_upload_bytes)
        self.ready = False
        self._push_lock = asyncio.Lock()
        self._inflight = 0
        self.store.clean()

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, engine: RolloutEngine) -> None:
        """Serve ``engine`` (the server starts answering liveness before the model loads)."""
        self.engine = engine

    def restore_committed(self) -> int:
        """Re-apply the last committed weights (if any) and return the serving version."""
        committed = self.store.committed()
        if committed is not None:
            files, version = committed
            self.engine.commit_update(files, version).result()
        self.metrics.weight_version.set(self.engine.weight_version)
        return self.engine.weight_version

    def warm_up(self) -> None:
        """Answer one request end to end; the server is ready after this."""
        self.engine.generate([[0]], Sampling(max_tokens=2, temperature=0.0))
        self.ready = True

    def is_ready(self) -> bool:
        """Loaded, warmed up and healthy: serving."""
        return self.ready and self.engine is not None and self.engine.healthy()

    def info(self) -> dict:
        """Model facts and the weight version being served: the fields of ``Info`` (HTTP
        :class:`~.schemas.Info`, gRPC ``pb2.Info``)."""
        if self.engine is None:
            raise ApiError(503, "unavailable", "the model is still loading")
        i = self.engine.info
        return {
            "model": i.model,
            "architecture": i.architecture,
            "num_moe_layers": i.num_moe_layers,
            "num_experts": i.num_experts,
            "top_k": i.top_k,
            "weight_version": self.engine.weight_version,
            "predictor": self.engine.plugin,
            "route_dtype": i.route_dtype,
            "max_model_len": i.max_model_len,
            "vocab_size": i.vocab_size,
        }

    # -- auth -----------------------------------------------------------------------------------
    def check_auth(self, authorization: str | None) -> None:
        if not self.api_key:
            raise ApiError(
                403,
                "forbidden",
                "control routes are disabled: the server has no API "
                "key (set PR2_API_KEY or --api-key-file)",
            )
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            raise ApiError(401, "unauthenticated", "missing or wrong bearer token")

    # -- generate -------------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready or self.engine is None:
            raise ApiError(503, "unavailable", "the engine is not ready")

    def _admit(self) -> None:
        self._require_ready()
        if not self.engine.healthy():
            raise ApiError(503, "unavailable", "the engine has failed")
        if self._inflight >= self.limits.max_queued_jobs:
            raise ApiError(429, "resource_exhausted", "too many requests in flight")

    def _submit(
        self,
        req: GenerateRequest,
        fault: str | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> cf.Future:
        """Admit, validate, count in flight (the caller uncounts when done) and submit."""
        self._admit()
        prompts, sampling = validate(
            req,
            self.engine.info,
            self.limits,
            self.engine.tokenize,
            self.engine.weight_version,
        )
        if fault and os.environ.get("PR2_ENABLE_FAULT_INJECTION") == "1":
            sampling.fault = fault
        self._inflight += 1
        try:
            return self.engine.submit(
                prompts,
                sampling,
                return_logprobs=req.return_logprobs,
                return_routes=req.return_routes,
                on_event=on_event,
            )
        except ENGINE_ERRORS as e:  # the engine's own checks
            self._inflight -= 1
            raise from_engine(e) from e
        except BaseException:
            self._inflight -= 1
            raise

    async def generate(
        self, req: GenerateRequest, protocol: str, fault: str | None = None
    ) -> list[Rollout]:
        t0 = time.perf_counter()
        fut = self._submit(req, fault)
        try:
            rollouts = await asyncio.wrap_future(fut)
        except ENGINE_ERRORS as e:  # a failed step: the engine serves on
            raise from_engine(e) from e
        finally:
            self._inflight -= 1
        self.metrics.observe_generate(protocol, rollouts, time.perf_counter() - t0)
        return rollouts

    async def stream(self, req: GenerateRequest, protocol: str) -> AsyncIterator[StreamEvent]:
        """Events as the engine produces them; cancelling the consumer aborts nothing already
        running (the job finishes in the engine and its events are dropped)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()
        fut = self._submit(req, on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        tokens = 0
        try:
            fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, f))
            while isinstance(item := await queue.get(), StreamEvent):
                tokens += len(item.token_ids)
                yield item
            item.result()  # raises the engine's error, if any
        except ENGINE_ERRORS as e:
            raise from_engine(e) from e
        finally:
            self._inflight -= 1
        self.metrics.observe_stream(protocol, tokens, time.perf_counter() - t0)

    # -- weight push ----------------------------------------------------------------------------
    async def push_weights(
        self,
        version: int,
        chunks: AsyncIterator[bytes],
        sha256: str | None,
        declared_size: int | None,
        protocol: str,
    ) -> dict:
        """Stream an upload to disk, verify it, apply it as ``version``."""
        self.store.check_declared(sha256, declared_size)
        self._require_ready()
        async with self._push_lock:
            try:
                require_newer(version, self.engine.weight_version)
            except ENGINE_ERRORS as e:
                raise from_engine(e) from e
            t0 = time.perf_counter()
            try:
                path, size = await self.store.receive(chunks, version, sha256, declared_size)
                received = time.perf_counter() - t0
                result = await self._apply(path, version)
            except BaseException:
                if self.engine.weight_version != version:
                    self.store.discard(version)
                self.metrics.errors.labels(kind="weight_push").inc()
                raise
            seconds = time.perf_counter() - t0
            self.metrics.observe_push(protocol, version, size, seconds)
            return {
                "weight_version": result.weight_version,
                "num_tensors": result.num_tensors,
                "seconds": seconds,
                "receive_seconds": received,
                "apply_seconds": result.reload_seconds,
            }

    async def _apply(self, path, version: int):
        """Check the received file in the engine, apply it between steps, record the commit."""
        try:
            files = self.engine.prepare_update(path, version)
            result = await asyncio.wrap_future(self.engine.commit_update(files, version))
        except ENGINE_ERRORS as e:
            raise from_engine(e) from e
        self.store.commit(files, version)
        return result
