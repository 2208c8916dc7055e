"""How the served weights change, held by :class:`~.rollout_service.RolloutService`: a push (an
upload), a load from a path (``--weights-dir``), a collective transfer (:mod:`.collective_receive`)
and a rollback.

Every change goes one way (:meth:`WeightUpdates._update`): its tensors are announced (a file's
header, a transfer's names, shapes and dtypes) and checked, then applied to the live model
bucket by bucket with every value checked finite as it goes (an upload, and a loaded checkpoint
of one file, as it arrives and is written to its :class:`~.weight_store.WeightStore` file
meanwhile, unless ``--apply-uploads stored``, when it is read from that file once whole, as a
sharded checkpoint is; a collective transfer as it arrives and is written to its file), the
canary runs after the last bucket (the engine undoes everything on a problem), and only then is
the version committed, fingerprinted and reported as the served source. Changes are serialised
by one lock; a failed one leaves no file and no change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pr2_serve.core.served_checkpoint import require_newer
from pr2_serve.service.canary import Canary
from pr2_serve.service.collective_receive import (
    TransferControl,
    TransferInitRequest,
    TransferRequest,
)
from pr2_serve.service.errors import ENGINE_ERRORS, ApiError, from_engine
from pr2_serve.service.load_path import files_to_load, resolve_load_path
from pr2_serve.service.metrics import Metrics
from pr2_serve.service.readiness import Readiness
from pr2_serve.service.streamed_upload import StreamedUpload, file_chunks
from pr2_serve.service.weight_store import WeightStore
from pr2_serve.transfer.bucket_plan import DEFAULT_BUCKET_BYTES

if TYPE_CHECKING:
    from pr2_serve.engine.rollout_engine import RolloutEngine

__all__ = ["WeightUpdates", "served_as"]


def served_as(source: str, version: int) -> str:
    """``Info.weight_source`` of a committed update (``source``: the commit record's)."""
    return f"pushed version {version}" if source == "push" else f"version {version}: {source}"


class WeightUpdates:
    """Every change of the served weights, one at a time (``lock``). ``engine``: set when the
    model has loaded (:meth:`attach`); ``on_served(source, digests)``: told of each committed
    version (``digests``: a future of its tensor digests, or None)."""

    def __init__(
        self,
        store: WeightStore,
        readiness: Readiness,
        metrics: Metrics,
        on_served: Callable[..., None],
        weights_dir: str | None = None,
        weight_transfer: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        persist: str = "sync",
        apply_uploads: str = "streamed",
    ) -> None:
        self.engine: RolloutEngine | None = None
        self.store, self.readiness, self.metrics = store, readiness, metrics
        self.on_served = on_served
        self.weights_dir = weights_dir  # what POST /v1/weights/load may read (None: disabled)
        self.bucket_bytes = bucket_bytes  # a file-borne update is applied in buckets this size
        self.persist = persist  # "sync": commit before answering; "async": fsync + commit after
        self.apply_uploads = apply_uploads  # "streamed": as it arrives; "stored": file first
        self._persisting: asyncio.Future | None = None
        self._applying: cf.Future | None = None  # the engine's future of the update running
        self._hasher = cf.ThreadPoolExecutor(1, thread_name_prefix="pr2-digests")
        self.lock = asyncio.Lock()  # one change at a time; the canary re-check takes it too
        # collective weight transfers, opt-in: pr2-serve --enable-weight-transfer
        self.transfer = TransferControl(None, enabled=weight_transfer)

    def attach(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.transfer.engine = engine

    def canary(self) -> Canary:
        """A fresh canary for the served model."""
        return Canary(self.engine.info)

    def _require_loaded(self) -> None:
        self.readiness.require_loaded(self.engine)

    # -- weight push and rollback -----------------------------------------------------------------
    async def push_weights(
        self,
        version: int,
        chunks: AsyncIterator[bytes],
        sha256: str | None,
        declared_size: int | None,
        protocol: str,
        xxh128: str | None = None,
    ) -> dict:
        """Apply an upload as ``version`` if it passes the canary: as it arrives
        (:mod:`.streamed_upload`) or, ``stored``, once it is whole in its file. The result has
        the time split: receive, check (names, shapes, dtypes), apply (bucket by bucket, every
        value checked finite as it goes), canary."""
        checksums = self.store.check_declared(sha256, declared_size, xxh128)
        if self.apply_uploads == "streamed":
            return await self._streamed(version, chunks, checksums, declared_size, protocol, "push")

        async def receive() -> tuple[list[Path], int]:
            path, size = await self.store.receive(chunks, version, sha256, declared_size, xxh128)
            return [path], size

        return await self._update(version, self._from_files(receive), protocol, "push")

    async def load_weights(self, version: int, path: str, protocol: str) -> dict:
        """Load a checkpoint from the server's own filesystem (only inside ``--weights-dir``,
        see :mod:`.load_path`) as ``version``, copied into the state directory (so a restart
        restores it) and checked and applied exactly as a push: a checkpoint of one file read
        once, applied as it is read and copied meanwhile (``--apply-uploads streamed``); a
        sharded one (or ``stored``) copied whole first, then applied from the copy."""
        files = files_to_load(resolve_load_path(path, self.weights_dir), self.weights_dir)
        source = f"load {path}"
        if self.apply_uploads == "streamed" and len(files) == 1:
            [file] = files
            chunks, size = file_chunks(file), file.stat().st_size
            return await self._streamed(version, chunks, {}, size, protocol, source, file)

        async def receive() -> tuple[list[Path], int]:
            return await self.store.copy_in(files, version), sum(f.stat().st_size for f in files)

        return await self._update(version, self._from_files(receive), protocol, source)

    async def transfer_init(self, req: TransferInitRequest) -> dict:
        """Join the trainer's weight-transfer group (:mod:`.transfer`)."""
        self._require_loaded()
        async with self.lock:
            return await asyncio.to_thread(self.transfer.init, req)

    async def transfer_weights(self, version: int, req: TransferRequest, protocol: str) -> dict:
        """Receive ``version`` over the transfer group (the trainer broadcasts while this
        runs) straight into the live model, bucket by bucket, and into the weight store; commit
        it as a push once the canary passes."""
        self._require_loaded()
        info = self.transfer.check(req)
        part, final = self.store.part_path(version), self.store.final_path(version)

        async def stage() -> tuple[dict, object, object, int, dict]:
            files, size = dict.fromkeys(info.names, str(final)), sum(info.nbytes())
            feed = self.transfer.feed(info, part, final, self.store.reuse_spare)
            return files, *feed, size, {}

        try:
            return await self._update(version, stage, protocol, f"transfer {info.names[0]}...")
        except BaseException:
            if self.transfer.info is not None:  # refused before receiving: the trainer re-inits
                await asyncio.to_thread(self.transfer.close)
            raise

    async def _streamed(
        self,
        version: int,
        chunks: AsyncIterator[bytes],
        checksums: dict[str, str],
        declared: int | None,
        protocol: str,
        source: str,
        file: Path | None = None,
    ) -> dict:
        """:meth:`_update` with ``chunks`` applied as they arrive (:class:`StreamedUpload`;
        ``file``: the loaded file they are read from)."""
        upload = StreamedUpload(
            self.store, self.engine, version, checksums, declared, self.bucket_bytes, file
        )
        stage = functools.partial(upload.stage, chunks)
        return await self._update(version, stage, protocol, source, upload.settle)

    def _from_files(self, receive):
        """A ``stage`` of :meth:`_update` for updates that arrive as files: ``receive()`` them,
        then check their headers (names, shapes, dtypes)."""

        async def stage() -> tuple[dict, None, None, int, dict]:
            t0 = time.perf_counter()
            paths, size = await receive()
            t1 = time.perf_counter()
            files = await self._engine_call(asyncio.to_thread(self.engine.check_files, paths))
            split = {"receive_seconds": t1 - t0, "check_seconds": time.perf_counter() - t1}
            return files, None, None, size, split

        return stage

    async def _update(self, version: int, stage, protocol: str, source: str, settle=None) -> dict:
        """``stage()`` -> ``({name: file}, feed, confirm, bytes, time split)``; apply them live
        with the canary (``feed``: how the buckets reach the workers, None: read from the files,
        whose digests are then computed meanwhile; ``confirm``: see
        :meth:`RolloutEngine.apply_live`), ``settle()`` (the stage's own loose ends; the
        update's digests if it computed them), commit;
        on any failure the files are removed and the previous weights serve on, unchanged."""
        self._require_loaded()
        async with self.lock:
            try:
                require_newer(version, self.engine.weight_version)
            except ENGINE_ERRORS as e:
                raise from_engine(e) from e
            t0, files, self._applying = time.perf_counter(), None, None
            try:
                files, feed, confirm, size, split = await stage()

                digests = None if feed is not None else self._digests(files)
                result, canary = await self._apply_live(files, version, feed, confirm)
            except BaseException:
                if settle is not None:
                    await settle()
                await _ended(self._applying)  # the engine is done with it (its caller may not be)
                if files is not None and self.engine.weight_version == version:
                    await self._commit(files, version, source)  # served: its caller went away
                    self.on_served(served_as(source, version), self._digests(files))
                else:
                    self.store.discard(version)
                self.metrics.errors.labels(kind="weight_push").inc()
                raise
            if settle is not None and (known := await settle()):
                digests = cf.Future()  # computed as the buckets arrived
                digests.set_result(known)
            await self._commit(files, version, source)
            self.on_served(served_as(source, version), digests or self._digests(files))
            seconds = time.perf_counter() - t0
            self.metrics.observe_push(protocol, version, size, seconds)
            return {
                "weight_version": result.weight_version,
                "num_tensors": result.num_tensors,
                "seconds": seconds,
                # a transfer is received while it is applied: its receive is its apply
                "receive_seconds": split.get("receive_seconds", result.reload_seconds),
                "check_seconds": split.get("check_seconds", 0.0),
                "apply_seconds": result.reload_seconds,
                "canary_seconds": canary.seconds,
            }

    async def _apply_live(self, files: dict[str, str], version: int, feed, confirm):
        canary = self.canary()
        fut = self.engine.apply_live(
            files,
            version,
            feed=feed,
            confirm=confirm,
            canary=canary,
            bucket_bytes=self.bucket_bytes,
        )
        self._applying = fut  # a cancelled caller must not cancel the update: shielded
        result = await self._engine_call(asyncio.shield(asyncio.wrap_future(fut)))
        self.readiness.set_fitness(None, version)
        self.metrics.weight_version.set(version)
        return result, canary

    async def _commit(self, files: dict[str, str], version: int, source: str) -> None:
        """Record the version now serving: at once (``sync``), or (``async``) flushed to the
        disk and recorded on a thread while the next update runs; either way after the previous
        version's record, and ``committed.json`` only ever names complete versions."""
        await self.persisted()
        if self.persist == "sync":
            self.store.commit(files, version, source=source)
            return
        delay = float(os.environ.get("PR2_TEST_PERSIST_DELAY_S", "0"))  # tests: a slow disk

        def persist() -> None:
            time.sleep(delay)
            self.store.persist(files, version, source=source)

        self._persisting = asyncio.ensure_future(asyncio.to_thread(persist))

    async def persisted(self) -> None:
        """Wait for the last version's asynchronous persist (before the next one is recorded,
        a rollback, shutdown). A failed persist leaves the previous record: logged, counted."""
        task, self._persisting = self._persisting, None
        if task is None:
            return
        await asyncio.wait([task])
        if task.exception() is not None:
            self.metrics.errors.labels(kind="weight_persist").inc()
            print(f"pr2-serve: persisting a weight version failed: {task.exception()!r}")

    def _digests(self, files: dict[str, str]) -> cf.Future:
        """The digests of an update's tensors, computed on a thread from its complete files
        (the served fingerprints wait for them when first asked, not the push)."""
        return self._hasher.submit(self.engine.update_digests, files)

    async def rollback(self, target: int, protocol: str) -> dict:
        """Serve kept version ``target`` (0: the model directory) again, as the next version
        number (versions never go back; samples report the new number)."""
        self._require_loaded()
        async with self.lock:
            await self.persisted()  # the kept versions are on record
            kept = dict(self.store.kept())
            if target != 0 and target not in kept:
                have = ", ".join(str(v) for v in [*kept, 0])
                raise ApiError(
                    404,
                    "not_found",
                    f"weight version {target} is not kept (kept: {have}; --keep-versions "
                    "sets how many)",
                    "version",
                )
            files, version = kept.get(target, {}), self.engine.weight_version + 1
            t0 = time.perf_counter()
            result, canary = await self._apply(files, version, replace=True)
            self.store.commit(files, version, replace=True, source=f"rollback to {target}")
            to = "the model directory" if target == 0 else f"version {target}"
            await asyncio.to_thread(self.on_served, f"version {version}: rolled back to {to}")
            seconds = time.perf_counter() - t0
            self.metrics.observe_push(protocol, version, 0, seconds)
            return {
                "weight_version": version,
                "rolled_back_to": target,
                "num_tensors": len(files),
                "seconds": seconds,
                "receive_seconds": 0.0,
                "check_seconds": 0.0,
                "apply_seconds": result.reload_seconds,
                "canary_seconds": canary.seconds,
            }

    async def _apply(self, files: dict[str, str], version: int, replace: bool):
        """Apply ``files`` between steps with the canary; the engine restores the previous
        weights if it fails. ``(UpdateResult, Canary)``; the served weights pass it now."""
        canary = self.canary()
        fut = self.engine.commit_update(files, version, canary=canary, replace=replace)
        result = await self._engine_call(asyncio.wrap_future(fut))
        self.readiness.set_fitness(None, version)
        self.metrics.weight_version.set(version)
        return result, canary

    @staticmethod
    async def _engine_call(awaitable):
        try:
            return await awaitable
        except ENGINE_ERRORS as e:
            raise from_engine(e) from e


async def _ended(fut: cf.Future | None) -> None:
    """Wait until the engine has finished ``fut`` (restored or served), whatever its outcome."""
    if fut is not None and not fut.done():
        await asyncio.wait([asyncio.wrap_future(fut)])
