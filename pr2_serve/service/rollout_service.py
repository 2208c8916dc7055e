"""The rollout service behind both protocols: lifecycle, auth, generate, stream, weight pushes.

Protocol layers (``http.py``, ``grpc_server.py``) only translate; every rule lives once below
them:

- **Generate:** a :class:`GenerateRequest` is admitted (ready, healthy, not too many in
  flight), checked against the model and the limits (:mod:`.validate`, errors naming the
  field), then submitted to the engine thread; engine errors map through :mod:`.errors`.
- **Weight push** (:class:`~.updates.WeightUpdates`, held as ``service.updates``): the upload
  is streamed to disk, hashed and size-limited by the
  :class:`WeightStore`, checked by the engine (every tensor's name, shape, dtype, and every
  value finite) and only then applied between steps; the :class:`Canary` then runs on the new
  weights before any request does, and on a problem the engine restores the previous weights
  and the push is refused. Only then does the store record the committed version, so a
  restarted server comes back serving it. A failed push leaves no file and no change.
  Loading a checkpoint from a path (``--weights-dir``) copies its files in and goes the same way.
- **Rollback:** the store keeps the last ``keep_versions`` committed versions; going back to
  one (or to 0, the model directory) applies its files as a new, higher version.
- **What is served:** each committed version (start, restore, push, rollback) is fingerprinted
  once (:mod:`pr2_serve.core.fingerprint`: policy and predictor apart, the predictor's norm) and its
  source recorded; ``/v1/info`` reports them, so a trainer can tell whether a server holds its
  weights -- not only the same version number.
- **Fitness:** the served weights must pass the canary (at start, after each change, and again
  whenever a sample comes out non-finite); until they do the service is not ready and refuses
  generates with 503, while pushes and rollbacks are still taken (:mod:`.readiness`: the one
  state every admission asks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hmac
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from pr2_serve.api.schemas import GenerateRequest
from pr2_serve.core.types import Rollout, StreamEvent
from pr2_serve.server.server_config import Limits
from pr2_serve.service.canary import output_problem
from pr2_serve.service.errors import ENGINE_ERRORS, ApiError, from_engine
from pr2_serve.service.metrics import Metrics
from pr2_serve.service.readiness import Phase, Readiness
from pr2_serve.service.updates import WeightUpdates
from pr2_serve.service.validate import validate
from pr2_serve.service.weight_store import WeightStore
from pr2_serve.transfer.bucket_plan import DEFAULT_BUCKET_BYTES

if TYPE_CHECKING:
    from pr2_serve.engine.rollout_engine import RolloutEngine

__all__ = ["MODEL_DIR_SOURCE", "RolloutService"]

MODEL_DIR_SOURCE = "model directory"  # Info.weight_source of version 0


class RolloutService:
    """One engine behind HTTP and gRPC (see module docstring); its weight changes are
    ``self.updates``."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        state_dir: str | os.PathLike,
        api_key: str | None,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        keep_versions: int = 2,
        weights_dir: str | None = None,
        weight_transfer: bool = False,
        persist: str = "sync",
        apply_uploads: str = "streamed",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.engine: RolloutEngine | None = None
        self.api_key = api_key
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.store = WeightStore(state_dir, self.limits.max_upload_bytes, keep_versions)
        self.readiness = Readiness()  # phase, canary fitness (on_fitness: e.g. gRPC health)
        self.updates = WeightUpdates(
            self.store,
            self.readiness,
            self.metrics,
            self._note_served,
            weights_dir,
            weight_transfer,
            persist=persist,
            apply_uploads=apply_uploads,
            bucket_bytes=bucket_bytes,
        )
        self._recheck: asyncio.Task | None = None
        self._inflight = 0
        self.served: dict = {}  # fingerprints and source of the committed weights (`_note_served`)
        self._served_lock = threading.Lock()
        self._fingerprinter = cf.ThreadPoolExecutor(1, thread_name_prefix="pr2-fingerprint")
        self._fingerprinted: cf.Future | None = None
        self.store.clean()
        if engine is not None:
            self.attach(engine)

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, engine: RolloutEngine) -> None:
        """Serve ``engine`` (the server starts answering liveness before the model loads)."""
        self.engine = engine
        self.updates.attach(engine)
        self.readiness.phase = Phase.WARMING

    def restore_committed(self, fresh: bool = False) -> str:
        """Re-apply the last committed weights (if any; ``fresh``: forget them) and say which
        state the server starts from (one log line)."""
        self.readiness.phase = Phase.RESTORING  # info() must not report version 0 meanwhile
        try:
            return self._restore(fresh)
        finally:
            self.readiness.phase = Phase.WARMING

    def _restore(self, fresh: bool) -> str:
        where = self.store.state_dir
        committed = self.store.committed()
        if fresh and committed is not None:
            self.store.reset()
            self._note_served(MODEL_DIR_SOURCE)
            said = f"--fresh: forgot committed version {committed[1]} in {where}; "
            return said + "serving the model directory (version 0)"
        if committed is None:
            self._note_served(MODEL_DIR_SOURCE)
            return f"no committed weights in {where}: serving the model directory (version 0)"
        files, version = committed
        self.engine.commit_update(files, version).result()
        self.metrics.weight_version.set(self.engine.weight_version)
        self._note_served(f"version {version} restored from the state directory {where}")
        kept = ", ".join(str(v) for v, _ in self.store.kept())
        return f"restored weight version {version} from {where} (kept for rollback: {kept}, 0)"

    def _note_served(self, source: str, digests: cf.Future | None = None) -> None:
        """Record where the committed weights came from and start fingerprinting them on a
        thread (after ``digests``, the update's tensor digests, computed meanwhile): a push
        does not wait for it; :meth:`info` does, if asked before it is done."""
        with self._served_lock:
            self.served = {"weight_source": source}
            self._fingerprinted = self._fingerprinter.submit(self._fingerprint, digests)

    def _fingerprint(self, digests: cf.Future | None) -> dict:
        """The fingerprints of the weights served (once per version, never per request)."""
        if digests is not None and digests.exception() is None:
            self.engine.keep_digests(digests.result())
        fp = self.engine.fingerprints()
        return {
            "policy_fingerprint": fp["policy"],
            "predictor_fingerprint": fp["predictor"],
            "predictor_active": fp["predictor_norm"] > 0,
            "predictor_norm": fp["predictor_norm"],
        }

    def _served_fields(self) -> dict:
        """``weight_source`` and the fingerprints of the weights served (see above)."""
        with self._served_lock:
            served, fingerprinted = dict(self.served), self._fingerprinted
        return {**served, **fingerprinted.result()}

    def warm_up(self) -> None:
        """Answer the canary end to end; the server is ready after this (not ready while the
        served weights fail it)."""
        c = self.updates.canary()
        try:
            self._set_fitness(c.check(self.engine.generate(c.prompts, c.sampling)))
        except ENGINE_ERRORS as e:  # a failed step: not servable, but pushes are taken
            self._set_fitness(f"the canary generate failed: {e}")
        self.readiness.phase = Phase.SERVING

    def _set_fitness(self, problem: str | None) -> None:
        self.readiness.set_fitness(problem, self.engine.weight_version)

    def is_ready(self) -> bool:
        """Loaded, warmed up, healthy and the served weights pass the canary: serving."""
        return self.readiness.serving(self.engine)

    def ready_body(self) -> tuple[bool, dict]:
        """``/readyz``: whether serving, and the body saying so (or why not)."""
        why = self.readiness.reason(self.engine)
        if why is None:
            return True, {"status": "ready", "weight_version": self.engine.weight_version}
        return False, {"status": "not ready", "reason": why}

    def info(self) -> dict:
        """Model facts and the weight version being served: the fields of ``Info`` (HTTP
        :class:`~.schemas.Info`, gRPC ``pb2.Info``)."""
        self.readiness.require_info(self.engine)
        i = self.engine.info
        if not self.served:  # an engine attached without restore_committed
            self._note_served(MODEL_DIR_SOURCE if self.engine.weight_version == 0 else "unknown")
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
            "kept_versions": [v for v, _ in self.store.kept()] + [0],
            "dtype": i.dtype,
            **self._served_fields(),
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
    def _admit(self) -> None:
        self.readiness.admit(self.engine)
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
        self._refuse_non_finite(rollouts)
        self.metrics.observe_generate(protocol, rollouts, time.perf_counter() - t0)
        return rollouts

    def _refuse_non_finite(self, samples: list) -> None:
        """A non-finite log-prob is never sent: a 500 ``non_finite_output`` instead, and the
        canary runs again (not ready if the served weights fail it)."""
        problem = output_problem(samples)
        if problem is None:
            return
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.get_running_loop().create_task(self._run_canary())
        raise ApiError(500, "non_finite_output", f"the model produced {problem}")

    async def _run_canary(self) -> None:
        async with self.updates.lock:  # the weights the canary sees are the served ones
            c = self.updates.canary()
            try:
                rollouts = await asyncio.wrap_future(self.engine.submit(c.prompts, c.sampling))
            except ENGINE_ERRORS as e:
                self._set_fitness(f"the canary generate failed: {e}")
                return
            self._set_fitness(c.check(rollouts))

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
                self._refuse_non_finite([item])
                yield item
            item.result()  # raises the engine's error, if any
        except ENGINE_ERRORS as e:
            raise from_engine(e) from e
        finally:
            self._inflight -= 1
        self.metrics.observe_stream(protocol, tokens, time.perf_counter() - t0)
