"""The rollout service behind both protocols: validation, generate, stream, weight pushes.

Protocol layers (``http.py``, ``grpc_server.py``) only translate; every rule lives here once:

- **Generate:** a :class:`GenerateRequest` is checked against the model (vocabulary, context
  length) with errors naming the field, then submitted to the engine thread.
- **Weight push:** the upload is streamed to a file in ``state_dir`` while it is hashed (never
  held in memory), size-limited as it arrives, checked (sha256, then every tensor's name, shape,
  dtype) and only then applied by the engine between steps. A failed push leaves no file and no
  change. The committed version is recorded in ``state_dir/committed.json`` (written atomically),
  so a restarted server comes back serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import WeightValidationError
from ..engine import EngineStepError, Rollout, RolloutEngine, Sampling, StreamEvent
from .metrics import Metrics
from .schemas import ApiError, GenerateRequest

COMMITTED = "committed.json"


@dataclass(slots=True)
class Limits:
    max_request_bytes: int = 16 << 20  # generate bodies
    max_upload_bytes: int = 64 << 30  # weight files
    max_queued_jobs: int = 256
    max_samples_per_request: int = 4096  # prompts x n
    max_tokens_per_request: int = 1 << 22  # prompts x n x max_tokens


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
        self.state_dir = Path(state_dir)
        self.weights_dir = self.state_dir / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.ready = False
        self._push_lock = asyncio.Lock()
        self._inflight = 0
        self._clean_partial_uploads()

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, engine: RolloutEngine) -> None:
        """Serve ``engine`` (the server starts answering liveness before the model loads)."""
        self.engine = engine

    def restore_committed(self) -> int:
        """Re-apply the last committed weights (if any) and return the serving version."""
        path = self.state_dir / COMMITTED
        if path.exists():
            state = json.loads(path.read_text())
            files = {n: str(self.weights_dir / f) for n, f in state["files"].items()}
            self.engine.commit_update(files, int(state["version"])).result()
        self.metrics.weight_version.set(self.engine.weight_version)
        return self.engine.weight_version

    def warm_up(self) -> None:
        """Answer one request end to end; the server is ready after this."""
        self.engine.generate([[0]], Sampling(max_tokens=2, temperature=0.0))
        self.ready = True

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
    def _sampling(self, req: GenerateRequest) -> tuple[list[list[int] | str], Sampling]:
        info = self.engine.info
        if req.min_weight_version > self.engine.weight_version:
            raise ApiError(
                409,
                "failed_precondition",
                f"serving weight version {self.engine.weight_version} < "
                f"min_weight_version {req.min_weight_version}",
                "min_weight_version",
            )
        if req.max_tokens >= info.max_model_len:
            raise ApiError(
                400,
                "invalid_argument",
                f"max_tokens {req.max_tokens} >= max_model_len {info.max_model_len}",
                "max_tokens",
            )
        if req.temperature == 0 and req.n > 1:
            raise ApiError(
                400,
                "invalid_argument",
                f"n {req.n} > 1 with temperature 0 (greedy): vLLM samples greedy requests "
                "once; use n=1, or top_k=1 with temperature > 0 for n greedy samples",
                "n",
            )
        if req.top_k > info.vocab_size:
            raise ApiError(
                400,
                "invalid_argument",
                f"top_k {req.top_k} > vocabulary size {info.vocab_size}",
                "top_k",
            )
        for i, t in enumerate(req.stop_token_ids):
            if not 0 <= t < info.vocab_size:
                raise ApiError(
                    400,
                    "invalid_argument",
                    f"token id {t} outside the vocabulary",
                    f"stop_token_ids[{i}]",
                )
        samples = len(req.prompts) * req.n
        if samples > self.limits.max_samples_per_request:
            raise ApiError(
                400,
                "invalid_argument",
                f"{len(req.prompts)} prompts x n={req.n} = {samples} samples exceeds "
                f"the limit {self.limits.max_samples_per_request}",
                "n",
            )
        if samples * req.max_tokens > self.limits.max_tokens_per_request:
            raise ApiError(
                400,
                "invalid_argument",
                f"{samples} samples x max_tokens={req.max_tokens} exceeds the limit "
                f"{self.limits.max_tokens_per_request} tokens per request",
                "max_tokens",
            )
        prompts: list[list[int] | str] = []
        for i, p in enumerate(req.prompts):
            ids = (
                p
                if isinstance(p, list)
                else self.engine.tokenizer(p, add_special_tokens=False)["input_ids"]
            )
            if not ids:
                raise ApiError(400, "invalid_argument", "empty prompt", f"prompts[{i}]")
            for j, t in enumerate(ids):
                if not 0 <= t < info.vocab_size:
                    raise ApiError(
                        400,
                        "invalid_argument",
                        f"token id {t} outside the vocabulary [0, {info.vocab_size})",
                        f"prompts[{i}][{j}]",
                    )
            if len(ids) + req.max_tokens > info.max_model_len:
                raise ApiError(
                    400,
                    "invalid_argument",
                    f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) "
                    f"exceeds max_model_len {info.max_model_len}",
                    f"prompts[{i}]",
                )
            prompts.append(list(ids))
        sampling = Sampling(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            max_tokens=req.max_tokens,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids),
        )
        return prompts, sampling

    def _admit(self) -> None:
        if not self.ready or self.engine is None:
            raise ApiError(503, "unavailable", "the engine is not ready")
        if not self.engine.healthy():
            raise ApiError(503, "unavailable", "the engine has failed")
        if self._inflight >= self.limits.max_queued_jobs:
            raise ApiError(429, "resource_exhausted", "too many requests in flight")

    async def generate(
        self, req: GenerateRequest, protocol: str, fault: str | None = None
    ) -> list[Rollout]:
        self._admit()
        prompts, sampling = self._sampling(req)
        if fault and os.environ.get("PR2_ENABLE_FAULT_INJECTION") == "1":
            sampling.fault = fault
        t0 = time.perf_counter()
        self._inflight += 1
        try:
            fut = self.engine.submit(
                prompts,
                sampling,
                return_logprobs=req.return_logprobs,
                return_routes=req.return_routes,
            )
            rollouts = await asyncio.wrap_future(fut)
        except EngineStepError as e:  # the step failed; the engine serves on
            raise ApiError(500, "engine_error", str(e)) from e
        except ValueError as e:  # the engine's own checks
            raise ApiError(400, "invalid_argument", str(e)) from e
        finally:
            self._inflight -= 1
        self.metrics.observe_generate(protocol, rollouts, time.perf_counter() - t0)
        return rollouts

    async def stream(self, req: GenerateRequest, protocol: str) -> AsyncIterator[StreamEvent]:
        """Events as the engine produces them; cancelling the consumer aborts nothing already
        running (the job finishes in the engine and its events are dropped)."""
        self._admit()
        prompts, sampling = self._sampling(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()
        self._inflight += 1
        try:
            fut = self.engine.submit(
                prompts,
                sampling,
                return_logprobs=req.return_logprobs,
                return_routes=req.return_routes,
                on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
            )
            fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, f))
            tokens = 0
            while True:
                item = await queue.get()
                if isinstance(item, StreamEvent):
                    tokens += len(item.token_ids)
                    yield item
                    continue
                item.result()  # raises the engine's error, if any
                break
        except ValueError as e:
            raise ApiError(400, "invalid_argument", str(e)) from e
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
        if not sha256 or len(sha256) != 64:
            raise ApiError(
                400, "invalid_argument", "a hex sha256 of the body is required", "sha256"
            )
        if declared_size is not None and declared_size > self.limits.max_upload_bytes:
            raise ApiError(
                413,
                "resource_exhausted",
                f"upload of {declared_size} bytes exceeds the limit {self.limits.max_upload_bytes}",
            )
        if not self.ready or self.engine is None:
            raise ApiError(503, "unavailable", "the engine is not ready")
        async with self._push_lock:
            current = self.engine.weight_version
            if version <= current:
                raise ApiError(
                    409,
                    "failed_precondition",
                    f"weight version {version} must be greater than {current}",
                    "version",
                )
            t0 = time.perf_counter()
            part = self.weights_dir / f".v{version}-{uuid.uuid4().hex[:8]}.part"
            final = self.weights_dir / f"v{version}.safetensors"
            try:
                size = await self._receive(chunks, part, sha256.lower(), declared_size)
                received = time.perf_counter() - t0
                part.replace(final)
                try:
                    files = self.engine.prepare_update(final, version)
                    result = await asyncio.wrap_future(self.engine.commit_update(files, version))
                except WeightValidationError as e:
                    raise ApiError(400, "invalid_argument", str(e), "weights") from e
                self._write_committed(files, version)
            except BaseException:
                part.unlink(missing_ok=True)
                if self.engine.weight_version != version:
                    final.unlink(missing_ok=True)
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

    async def _receive(
        self, chunks: AsyncIterator[bytes], part: Path, sha256: str, declared: int | None
    ) -> int:
        """Stream ``chunks`` into ``part``; hashing and disk writes run on a writer thread
        (both release the GIL), overlapping with receiving the next chunks."""
        writer = _HashingWriter(part)
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.limits.max_upload_bytes:
                    raise ApiError(
                        413,
                        "resource_exhausted",
                        f"upload exceeds the limit {self.limits.max_upload_bytes}",
                    )
                await writer.put(chunk)
        except ApiError:
            writer.abort()
            raise
        except OSError as e:
            writer.abort()
            raise _storage_error(e) from e
        except Exception as e:  # the client went away mid-body
            writer.abort()
            raise ApiError(
                400,
                "upload_interrupted",
                f"upload interrupted after {size} bytes ({type(e).__name__})",
                "body",
            ) from e
        try:
            digest = await writer.finish()
        except OSError as e:
            raise _storage_error(e) from e
        if declared is not None and size != declared:
            raise ApiError(
                400, "invalid_argument", f"upload ended after {size} of {declared} bytes", "body"
            )
        if not hmac.compare_digest(digest, sha256):
            raise ApiError(
                400,
                "invalid_argument",
                f"sha256 mismatch: body is {digest}, header says {sha256}",
                "sha256",
            )
        return size

    def _write_committed(self, update_files: dict[str, str], version: int) -> None:
        path = self.state_dir / COMMITTED
        prev = json.loads(path.read_text())["files"] if path.exists() else {}
        files = {**prev, **{n: Path(f).name for n, f in update_files.items()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "files": files}, indent=1))
        os.replace(tmp, path)
        live = set(files.values())
        for f in self.weights_dir.glob("v*.safetensors"):
            if f.name not in live:
                f.unlink(missing_ok=True)

    def _clean_partial_uploads(self) -> None:
        for f in self.weights_dir.glob(".v*.part"):
            f.unlink(missing_ok=True)
        path = self.state_dir / COMMITTED
        live = set(json.loads(path.read_text())["files"].values()) if path.exists() else set()
        for f in self.weights_dir.glob("v*.safetensors"):
            if f.name not in live:  # renamed but never committed (killed mid-apply)
                with contextlib.suppress(OSError):
                    f.unlink()


def _storage_error(e: OSError) -> ApiError | OSError:
    """Disk full / file too large / quota -> 507 Insufficient Storage; other I/O errors as is."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ApiError(507, "insufficient_storage", f"no space to store the upload: {e.strerror}")
    return e


class _HashingWriter:
    """Write + sha256 on a thread, fed in ~4 MiB batches through a bounded queue."""

    BATCH = 4 << 20

    def __init__(self, path: Path) -> None:
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._file = open(path, "wb")  # noqa: SIM115 - closed by the thread
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (block := self._q.get()) is not None:
                self._hash.update(block)
                self._file.write(block)
        except BaseException as e:
            self._error = e
            while self._q.get() is not None:  # drain so producers never block
                pass
        finally:
            self._file.close()

    async def put(self, chunk: bytes) -> None:
        if self._error is not None:  # e.g. the disk filled up: stop reading the upload
            raise self._error
        self._buf.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= self.BATCH:
            await self._flush()

    async def _flush(self) -> None:
        if self._buf:
            block = b"".join(self._buf)
            self._buf, self._buffered = [], 0
            await asyncio.to_thread(self._q.put, block)

    async def finish(self) -> str:
        await self._flush()
        await asyncio.to_thread(self._q.put, None)
        await asyncio.to_thread(self._thread.join)
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._buf.clear()
        self._q.put(None)
        self._thread.join()
