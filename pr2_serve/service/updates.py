"""How the served weights change, held by :class:`~.rollout_service.RolloutService`: a push (an
upload), a load from a path (``--weights-dir``), a collective transfer (:mod:`.collective_receive`)
and a rollback.

Every change goes one way (:meth:`WeightUpdates._update`): its files are received into the
:class:`~.weight_store.WeightStore`, checked by the engine (names, shapes, dtypes, every value
finite), applied between steps with the canary (the engine restores the previous weights on a
problem), and only then committed, fingerprinted and reported as the served source. Changes are
serialised by one lock; a failed one leaves no file and no change.
"""

from __future__ import annotations

import asyncio
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
from pr2_serve.service.weight_store import WeightStore

if TYPE_CHECKING:
    from pr2_serve.engine.rollout_engine import RolloutEngine

__all__ = ["WeightUpdates", "served_as"]


def served_as(source: str, version: int) -> str:
    """``Info.weight_source`` of a committed update (``source``: the commit record's)."""
    return f"pushed version {version}" if source == "push" else f"version {version}: {source}"


class WeightUpdates:
    """Every change of the served weights, one at a time (``lock``). ``engine``: set when the
    model has loaded (:meth:`attach`); ``on_served(source)``: told of each committed version."""

    def __init__(
        self,
        store: WeightStore,
        readiness: Readiness,
        metrics: Metrics,
        on_served: Callable[[str], None],
        weights_dir: str | None = None,
        weight_transfer: bool = False,
    ) -> None:
        self.engine: RolloutEngine | None = None
        self.store, self.readiness, self.metrics = store, readiness, metrics
        self.on_served = on_served
        self.weights_dir = weights_dir  # what POST /v1/weights/load may read (None: disabled)
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
    ) -> dict:
        """Stream an upload to disk, verify it, apply it as ``version`` if it passes the canary.
        The result has the time split: receive, check (names, shapes, dtypes, finite values),
        apply (the reload), canary."""
        self.store.check_declared(sha256, declared_size)

        async def receive() -> tuple[list[Path], int]:
            path, size = await self.store.receive(chunks, version, sha256, declared_size)
            return [path], size

        return await self._update(version, receive, protocol, "push")

    async def load_weights(self, version: int, path: str, protocol: str) -> dict:
        """Load a checkpoint from the server's own filesystem (only inside ``--weights-dir``,
        see :mod:`.load_path`) as ``version``: copied into the state directory (so a restart
        restores it), then checked and applied exactly as a push."""
        files = files_to_load(resolve_load_path(path, self.weights_dir), self.weights_dir)

        async def receive() -> tuple[list[Path], int]:
            return await self.store.copy_in(files, version), sum(f.stat().st_size for f in files)

        return await self._update(version, receive, protocol, f"load {path}")

    async def transfer_init(self, req: TransferInitRequest) -> dict:
        """Join the trainer's weight-transfer group (:mod:`.transfer`)."""
        self._require_loaded()
        async with self.lock:
            return await asyncio.to_thread(self.transfer.init, req)

    async def transfer_weights(self, version: int, req: TransferRequest, protocol: str) -> dict:
        """Receive ``version`` over the transfer group (the trainer broadcasts while this
        runs) into the weight store, then check, apply and commit it as a push."""
        self._require_loaded()
        info = self.transfer.check(req)

        async def receive() -> tuple[list[Path], int]:
            path = await self.store.take(version, lambda p: self.transfer.receive(info, str(p)))
            return [path], path.stat().st_size

        try:
            return await self._update(version, receive, protocol, f"transfer {info.names[0]}...")
        except BaseException:
            if self.transfer.info is not None:  # refused before receiving: the trainer re-inits
                await asyncio.to_thread(self.transfer.close)
            raise

    async def _update(self, version: int, receive, protocol: str, source: str) -> dict:
        """Receive ``version``'s files, check and apply them with the canary, commit; on any
        failure the received files are removed and the previous weights serve on."""
        self._require_loaded()
        async with self.lock:
            try:
                require_newer(version, self.engine.weight_version)
            except ENGINE_ERRORS as e:
                raise from_engine(e) from e
            t0 = time.perf_counter()
            try:
                paths, size = await receive()
                received = time.perf_counter() - t0
                t1 = time.perf_counter()
                files = {}
                for path in paths:
                    prepare = asyncio.to_thread(self.engine.prepare_update, path, version)
                    files.update(await self._engine_call(prepare))
                checked = time.perf_counter() - t1
                # the fingerprints' digests are computed while the engine applies the update
                digests = asyncio.ensure_future(
                    asyncio.to_thread(self.engine.update_digests, files)
                )
                try:
                    result, canary = await self._apply(files, version, replace=False)
                finally:
                    await asyncio.wait([digests])
                if digests.exception() is None:  # else fingerprinted when committed, as before
                    self.engine.keep_digests(digests.result())
            except BaseException:
                if self.engine.weight_version != version:
                    self.store.discard(version)
                self.metrics.errors.labels(kind="weight_push").inc()
                raise
            self.store.commit(files, version, source=source)
            await asyncio.to_thread(self.on_served, served_as(source, version))
            seconds = time.perf_counter() - t0
            self.metrics.observe_push(protocol, version, size, seconds)
            return {
                "weight_version": result.weight_version,
                "num_tensors": result.num_tensors,
                "seconds": seconds,
                "receive_seconds": received,
                "check_seconds": checked,
                "apply_seconds": result.reload_seconds,
                "canary_seconds": canary.seconds,
            }

    async def rollback(self, target: int, protocol: str) -> dict:
        """Serve kept version ``target`` (0: the model directory) again, as the next version
        number (versions never go back; samples report the new number)."""
        self._require_loaded()
        async with self.lock:
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
