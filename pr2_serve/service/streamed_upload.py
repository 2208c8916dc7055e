"""A weight upload applied to the live model as it arrives (``pr2-serve --apply-uploads
streamed``, the default; HTTP ``PUT /v1/weights/{version}`` and gRPC ``UpdateWeights`` alike).

The body is read chunk by chunk on the event loop (:class:`SafetensorsStream`). Its safetensors
header comes first and is checked before the engine is asked for anything: every name, shape
and dtype one the model takes, the body's length (which the header fixes) against the declared
size and the upload limit. Then each bucket of whole tensors is handed to the engine thread as
soon as it is complete (:mod:`pr2_serve.engine.bucket_handoff`), where it is checked finite and
loaded into the live model while the next one is received; every byte is hashed and written to
the version's file in the weight store on a writer thread meanwhile. Once the last bucket is
applied the engine finishes the update and runs the canary while the size and checksums are
checked and the file is renamed complete; the version is served only if both pass. A body that
ends short, breaks off, fails its checksum or stalls for :data:`STALL_S` seconds is undone like a
bad bucket: the model is restored and no file is left. After a refusal the rest of the body is
read and dropped, so the client gets the answer, not a broken pipe.

A checkpoint of one file loaded from the server's filesystem (``POST /v1/weights/load``) is
applied the same way, its ``source`` read once: applied and copied into the store as it is read
(the bytes applied are the bytes kept, even if its owner rewrites it meanwhile). The upload limit
does not apply to it, errors name the file, and a refused one is not read to its end.

Generation waits from the header's check until the canary has passed (a sample never
mixes versions), so on a link slower than the apply ``--apply-uploads stored`` is the better
choice: the whole file is received first (generation goes on meanwhile), then applied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pr2_serve.core.body_checksum import BodyHasher
from pr2_serve.core.fingerprint import tensor_digest
from pr2_serve.core.safetensors_stream import Layout, SafetensorsStream
from pr2_serve.engine.bucket_handoff import (
    ALL_BUCKETS,
    END,
    BucketHandoff,
    handoff_confirm,
    handoff_feed,
)
from pr2_serve.service.errors import ENGINE_ERRORS, ApiError, from_engine
from pr2_serve.service.weight_store import (
    HashingWriter,
    WeightStore,
    check_received,
    too_large,
    upload_error,
)

__all__ = ["READ_BYTES", "STALL_S", "StreamedUpload", "file_chunks"]

STALL_S = 60.0
"""Seconds an upload may send nothing (the engine's wait for a bucket, the receiver's for a
chunk) before it is given up and undone."""
READ_BYTES = 4 << 20
"""The chunk a loaded file is read in (:func:`file_chunks`)."""


async def file_chunks(path: Path, size: int = READ_BYTES) -> AsyncIterator[bytes]:
    """``path``'s bytes, ``size`` at a time, each read on a thread."""
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk


class StreamedUpload:
    """One upload of ``version`` (see module docstring): :meth:`stage` is the update's stage,
    :meth:`settle` runs once the engine is done with it, whatever the outcome."""

    def __init__(
        self,
        store: WeightStore,
        engine,
        version: int,
        checksums: dict[str, str],
        declared: int | None,
        bucket_bytes: int,
        source: Path | None = None,
    ) -> None:
        self.store, self.engine, self.version, self.source = store, engine, version, source
        self.checksums, self.declared, self.bucket_bytes = checksums, declared, bucket_bytes
        self.part, self.final = store.part_path(version), store.final_path(version)
        self.handoff = BucketHandoff()
        self.split: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._layout: Layout | None = None
        self.digests: dict[tuple[str, str], bytes] = {}  # of each tensor, as it arrives

    async def stage(self, chunks: AsyncIterator[bytes]):
        """Receive until the header is checked, then go on receiving on a task:
        ``({name: file}, feed, confirm, bytes, time split)`` for the update."""
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._receive(aiter(chunks), first))
        await asyncio.wait([first, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            await self._task  # it failed before the first bucket: its error
        layout = first.result()
        files = {e.name: str(self.final) for e in layout.entries}
        feed, confirm = handoff_feed(self.handoff, STALL_S), handoff_confirm(self.handoff, STALL_S)
        return files, feed, confirm, layout.total, self.split

    async def settle(self) -> dict | None:
        """Stop handing buckets over and wait for the receiver: done, or reading and dropping
        the rest of a refused body (at most :data:`STALL_S` between chunks; a loaded file is
        not read on). The digests of the update's tensors (:func:`tensor_digest` by
        ``(file, name)``) if it completed."""
        self.handoff.close()
        if self._task is None:
            return None
        await asyncio.wait([self._task])
        if self._task.cancelled() or self._task.exception() is not None:
            return None  # the update already raised it (or its cause)
        return self.digests if self.final.exists() else None

    async def _receive(self, chunks, first: asyncio.Future) -> None:
        t0, loop = time.perf_counter(), asyncio.get_running_loop()
        stream, hasher = SafetensorsStream(self.bucket_bytes), BodyHasher(self.checksums)
        self.store.reuse_spare(self.part)
        writer = HashingWriter(self.part, hasher)
        try:
            async with asyncio.timeout(STALL_S) as clock:
                async for chunk in chunks:
                    clock.reschedule(None)  # waiting for the engine is not a stall
                    if not await self._take(stream, chunk, writer, first):
                        writer.abort()
                        self.part.unlink(missing_ok=True)
                        return None if self.source else await _drain(chunks, clock)
                    clock.reschedule(loop.time() + STALL_S)
            if not stream.complete:
                raise _short(stream, self.source)
            if not await asyncio.to_thread(self.handoff.put, ALL_BUCKETS):
                writer.abort()  # the engine stopped (its error is the update's)
                self.part.unlink(missing_ok=True)
                return
            await writer.finish()
            check_received(stream.received, self.declared, hasher)
            self.part.replace(self.final)
        except BaseException as e:
            writer.abort()
            self.part.unlink(missing_ok=True)
            err = (
                _stalled(stream.received)
                if isinstance(e, TimeoutError)
                else upload_error(e, stream.received)
            )
            if first.done() and isinstance(err, Exception):
                await asyncio.to_thread(self.handoff.put, err)  # the engine raises it, undoes
            if err is e:
                raise
            raise err from e
        self.split["receive_seconds"] = time.perf_counter() - t0
        await asyncio.to_thread(self.handoff.put, END)

    async def _take(self, stream, chunk, writer, first) -> bool:
        """Feed ``chunk``; hand each bucket it completes to the engine (False: it stopped)."""
        if self._limit is not None and stream.received + len(chunk) > self._limit:
            raise too_large(self._limit)
        pieces = _malformed_is_400(stream.pieces(chunk), self.source)
        for piece in pieces:  # each handed on before the next
            if isinstance(piece, bytes):  # the header: checked before anything is applied
                t0 = time.perf_counter()
                self._layout = self._check(stream.layout)
                self.split["check_seconds"] = time.perf_counter() - t0
                await writer.put(piece)
                first.set_result(self._layout)  # the engine may start: it waits for a bucket
                continue
            await writer.put(piece.data)
            if not await asyncio.to_thread(self.handoff.put, piece.pairs):
                return False
            final = str(self.final)  # digested while the engine applies it
            self.digests.update({(final, n): tensor_digest(n, t) for n, t in piece.pairs})
        return True

    @property
    def _limit(self) -> int | None:
        """The upload limit (none for a loaded file: ``--weights-dir`` is the operator's)."""
        return None if self.source else self.store.max_upload_bytes

    def _check(self, layout: Layout) -> Layout:
        if not layout.entries:
            raise ApiError(400, "invalid_argument", "empty update", "weights")
        if self.declared is not None and layout.total != self.declared:
            said = f"{self.source} holds" if self.source else "the request declares"
            raise ApiError(
                400,
                "invalid_argument",
                f"the safetensors header describes {layout.total} bytes, {said} {self.declared}",
                "path" if self.source else "body",
            )
        if self._limit is not None and layout.total > self._limit:
            raise too_large(self._limit)
        try:
            for e in layout.entries:
                self.engine.check_tensor(e.name, e.shape, e.dtype)
        except ENGINE_ERRORS as e:
            raise from_engine(e) from None
        return layout


def _malformed_is_400(pieces, source: Path | None):
    try:
        yield from pieces
    except ValueError as e:
        field, where = ("path", f"{source}: ") if source else ("weights", "")
        raise ApiError(400, "invalid_argument", f"{where}{e}", field) from None


def _stalled(size: int) -> ApiError:
    return ApiError(
        408, "upload_stalled", f"upload stalled: no bytes for {STALL_S:g} s after {size}", "body"
    )


def _short(stream: SafetensorsStream, source: Path | None) -> ApiError:
    of = f" of {stream.layout.total}" if stream.layout else ", inside the safetensors header"
    what, field = (str(source), "path") if source else ("upload", "body")
    return ApiError(
        400, "invalid_argument", f"{what} ended after {stream.received} bytes{of}", field
    )


async def _drain(chunks, clock) -> None:
    """Read and drop the rest of a refused body (the client then reads the answer)."""
    loop = asyncio.get_running_loop()
    clock.reschedule(loop.time() + STALL_S)
    async for _ in chunks:
        clock.reschedule(loop.time() + STALL_S)
