"""Pushed weights on disk: uploads streamed to a file while hashed, and the commit record.

An upload is written to ``weights/.v<version>-<id>.part`` while it is hashed (on a writer
thread, never held in memory), size-limited as it arrives, checked against its declared size
and sha256, and only then renamed to ``weights/v<version>.safetensors`` (a checkpoint loaded
from a path is copied in as ``weights/v<version>-<k>.safetensors``). The committed version and
its files are recorded in ``committed.json`` (written atomically), so a restarted server
comes back serving them, with the files of the ``keep_versions - 1`` versions committed before
it (``history``, newest first: what a rollback can go back to); files no kept version refers to
are removed (on start and on each commit).

The file a removed version leaves is kept as a spare (``spare/``, at most :data:`SPARES`) for
the next update to write over (:meth:`WeightStore.reuse_spare`): its pages are still in the
kernel's cache, so writing over them is a copy, where a new file's pages must first be found
and zeroed (``benchmarks/weights.py`` times both; a new file is the slow and variable one where
the host lends memory again page by page after the guest frees it, as on our machines).
Writers of these files therefore never truncate on open: they write every byte and set the
size at the end. A spare is written over only if nobody else has it open or mapped
(:mod:`pr2_serve.core.file_lease`): a reader that mapped a version's file
(``safetensors.load_file``) keeps its bytes, and the next update then goes into a new file.

``committed.json``: ``{"version": 5, "files": {tensor name: file name}, "source": "push",
"history": [{"version": 4, "files": {...}, "source": "push"}]}``; ``files`` are the tensors
pushed on top of the checkpoint (all of them, cumulated over pushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import queue
import shutil
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pr2_serve.core.body_checksum import BodyHasher, ChecksumError, declared_checksums
from pr2_serve.core.file_lease import held_elsewhere
from pr2_serve.service.errors import ApiError

__all__ = [
    "COMMITTED",
    "HashingWriter",
    "WeightStore",
    "check_received",
    "too_large",
    "upload_error",
]

COMMITTED = "committed.json"
SPARES = 1  # removed versions' files kept to be written over (one model's size on disk)


class WeightStore:
    """The weight files of one server under ``state_dir`` (see module docstring)."""

    def __init__(
        self, state_dir: str | os.PathLike, max_upload_bytes: int, keep_versions: int = 2
    ) -> None:
        self.state_dir = Path(state_dir)
        self.weights_dir = self.state_dir / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.spare_dir = self.state_dir / "spare"
        self.max_upload_bytes = max_upload_bytes
        self.keep_versions = max(1, keep_versions)

    # -- the commit record ----------------------------------------------------------------------
    def _record(self) -> dict | None:
        path = self.state_dir / COMMITTED
        return json.loads(path.read_text()) if path.exists() else None

    def committed(self) -> tuple[dict[str, str], int] | None:
        """``({tensor name: file}, version)`` of the last commit, or None (never pushed)."""
        kept = self.kept()
        return (kept[0][1], kept[0][0]) if kept else None

    def kept(self) -> list[tuple[int, dict[str, str]]]:
        """``(version, {tensor name: file})`` of every kept version, the committed one first."""
        record = self._record()
        if record is None:
            return []
        entries = [record, *record.get("history", [])]
        return [(int(e["version"]), self._paths(e["files"])) for e in entries]

    def _paths(self, files: dict[str, str]) -> dict[str, str]:
        return {n: str(self.weights_dir / f) for n, f in files.items()}

    def commit(
        self, update_files: dict[str, str], version: int, replace: bool = False, source="push"
    ) -> None:
        """Record ``version`` atomically: its files on top of the previous commit's (or, with
        ``replace``, exactly ``update_files``: a rollback); the previous commit joins the
        history; remove the files no kept version refers to."""
        record = self._record()
        prev = record["files"] if record is not None and not replace else {}
        files = {**prev, **{n: Path(f).name for n, f in update_files.items()}}
        history = []
        if record is not None:
            history = [{k: record[k] for k in ("version", "files", "source") if k in record}]
            history += record.get("history", [])
        new = {
            "version": version,
            "files": files,
            "source": source,
            "history": history[: self.keep_versions - 1],
        }
        path = self.state_dir / COMMITTED
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(new, indent=1))
        os.replace(tmp, path)
        self._remove_unreferenced(self._live(new))

    def persist(self, update_files: dict[str, str], version: int, source="push") -> None:
        """Make ``version`` durable, then record it: its files are flushed to the disk
        (``fsync``) before ``committed.json`` names it (written atomically and flushed too), so
        the record only ever names complete versions (``pr2-serve --persist async`` runs this
        on a thread after the version already serves)."""
        for path in dict.fromkeys(update_files.values()):
            _fsync(path)
        self.commit(update_files, version, source=source)
        _fsync(self.state_dir / COMMITTED)

    def reset(self) -> None:
        """Forget every commit and remove its files and the spares (``pr2-serve --fresh``)."""
        (self.state_dir / COMMITTED).unlink(missing_ok=True)
        self._remove_unreferenced(set())
        shutil.rmtree(self.spare_dir, ignore_errors=True)

    def clean(self) -> None:
        """Remove partial uploads and files renamed but never committed (killed mid-apply)."""
        for f in self.weights_dir.glob(".v*.part"):
            f.unlink(missing_ok=True)
        self._remove_unreferenced(self._live(self._record()))

    @staticmethod
    def _live(record: dict | None) -> set[str]:
        """File names any kept version of ``record`` refers to."""
        if record is None:
            return set()
        return {f for e in [record, *record.get("history", [])] for f in e["files"].values()}

    def live_files(self) -> set[str]:
        """Names of the files in ``weights/`` that kept versions refer to."""
        return self._live(self._record())

    def _remove_unreferenced(self, live: set[str]) -> None:
        """Remove the files not in ``live``: the first ones become spares, the rest go."""
        for f in self.weights_dir.glob("v*.safetensors"):
            if f.name not in live:
                with contextlib.suppress(OSError):
                    if not self._keep_as_spare(f):
                        f.unlink()

    def _keep_as_spare(self, f: Path) -> bool:
        self.spare_dir.mkdir(exist_ok=True)
        free = [s for k in range(SPARES) if not (s := self.spare_dir / f"{k}").exists()]
        if not free:
            return False
        f.replace(free[0])
        return True

    def reuse_spare(self, part: Path) -> None:
        """Put a spare at ``part``, if there is one that nobody else has open or mapped, for
        the update's writer to write over (see module docstring); else ``part`` is left to be
        created. A spare still held is removed instead: its holder keeps the bytes it has."""
        for k in range(SPARES):
            with contextlib.suppress(OSError):  # none there, or taken by another update
                (self.spare_dir / f"{k}").replace(part)
                if held_elsewhere(part):
                    part.unlink()
                return

    def discard(self, version: int) -> None:
        """Remove the received or copied-in (uncommitted) files of ``version``."""
        self.final_path(version).unlink(missing_ok=True)
        for f in self.weights_dir.glob(f"v{version}-*.safetensors"):
            f.unlink(missing_ok=True)

    def part_path(self, version: int) -> Path:
        """A new partial file of ``version`` (removed at start if a crash left it)."""
        return self.weights_dir / f".v{version}-{uuid.uuid4().hex[:8]}.part"

    def final_path(self, version: int) -> Path:
        """Where ``version``'s single file lives (an upload's, a collective transfer's)."""
        return self.weights_dir / f"v{version}.safetensors"

    # -- uploads --------------------------------------------------------------------------------
    def check_declared(
        self, sha256: str | None, declared_size: int | None, xxh128: str | None = None
    ) -> dict[str, str]:
        """Refuse an upload from its headers, before reading it: no checksum (or a malformed
        one), or too large; the checksums it declares (:mod:`pr2_serve.core.body_checksum`)."""
        try:
            checksums = declared_checksums(sha256=sha256, xxh128=xxh128)
        except ChecksumError as e:
            raise ApiError(400, "invalid_argument", str(e), e.field) from None
        if declared_size is not None and declared_size > self.max_upload_bytes:
            raise ApiError(
                413,
                "resource_exhausted",
                f"upload of {declared_size} bytes exceeds the limit {self.max_upload_bytes}",
            )
        return checksums

    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        version: int,
        sha256: str | None,
        declared: int | None,
        xxh128: str | None = None,
    ) -> tuple[Path, int]:
        """Stream ``chunks`` to disk, check size and checksums, and return the file of
        ``version`` and its size; on any failure no file is left."""
        part = self.part_path(version)
        hasher = BodyHasher(self.check_declared(sha256, None, xxh128))
        self.reuse_spare(part)
        try:
            size = await self._write(chunks, part, hasher)
            check_received(size, declared, hasher)
            final = self.final_path(version)
            part.replace(final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return final, size

    async def copy_in(self, files: list[Path], version: int) -> list[Path]:
        """Copy a checkpoint's files into the store as ``version``'s (a copy, not a link: the
        owner may rewrite its files in place; the server must restore this version after a
        restart); on any failure no file is left."""
        parts = [self.part_path(version) for _ in files]
        finals = [self.weights_dir / f"v{version}-{k}.safetensors" for k in range(len(files))]
        try:
            for src, part, final in zip(files, parts, finals, strict=True):
                await asyncio.to_thread(shutil.copyfile, src, part)
                part.replace(final)
        except BaseException as e:
            for f in [*parts, *finals]:
                f.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise storage_error(e) from e
            raise
        return finals

    async def _write(self, chunks: AsyncIterator[bytes], part: Path, hasher: BodyHasher) -> int:
        """The size of ``chunks``, written to ``part`` and hashed by ``hasher`` on a writer
        thread (both release the GIL), overlapping with receiving more chunks."""
        writer = HashingWriter(part, hasher)
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise too_large(self.max_upload_bytes)
                await writer.put(chunk)
        except BaseException as e:
            writer.abort()
            if (err := upload_error(e, size)) is e:
                raise
            raise err from e
        try:
            await writer.finish()
            return size
        except OSError as e:
            raise storage_error(e) from e


def too_large(limit: int) -> ApiError:
    return ApiError(413, "resource_exhausted", f"upload exceeds the limit {limit}")


def upload_error(e: BaseException, size: int) -> BaseException:
    """What an upload that failed after ``size`` bytes answers: its own :class:`ApiError`,
    507 for a full disk, 400 ``upload_interrupted`` when the client went away mid-body."""
    if isinstance(e, ApiError) or not isinstance(e, Exception):
        return e
    if isinstance(e, OSError):
        return storage_error(e)
    return ApiError(
        400,
        "upload_interrupted",
        f"upload interrupted after {size} bytes ({type(e).__name__})",
        "body",
    )


def check_received(size: int, declared: int | None, hasher: BodyHasher) -> None:
    """A complete upload has its declared size and checksums (400 naming which)."""
    if declared is not None and size != declared:
        raise ApiError(
            400, "invalid_argument", f"upload ended after {size} of {declared} bytes", "body"
        )
    try:
        hasher.check()
    except ChecksumError as e:
        raise ApiError(400, "invalid_argument", str(e), e.field) from None


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(e: OSError) -> ApiError | OSError:
    """Disk full / file too large / quota -> 507 Insufficient Storage; other I/O errors as is."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ApiError(507, "insufficient_storage", f"no space to store the upload: {e.strerror}")
    return e


class HashingWriter:
    """Write + hash (``hasher``) on a thread, fed in ~4 MiB batches through a bounded queue (a
    block that size or larger goes as it is, uncopied, once everything before it is written:
    a bucket of a streamed upload is then the only one the writer holds, and a disk slower
    than the wire holds the receive back instead of buckets piling up in memory)."""

    BATCH = 4 << 20

    def __init__(self, path: Path, hasher: BodyHasher) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._hash = hasher
        self._error: BaseException | None = None
        # written over, not truncated (a spare: see module docstring); cut to size at the end
        self._file = open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb")  # noqa: SIM115
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Write each block until ``None``, then cut the file to size; after a failure,
        take and drop the rest (so producers never block), every block marked done."""
        try:
            while (block := self._q.get()) is not None:
                try:
                    if self._error is None:
                        self._hash.update(block)
                        self._file.write(block)
                except BaseException as e:
                    self._error = e
                finally:
                    del block  # let it go before waiting for the next
                    self._q.task_done()
            if self._error is None:
                self._file.truncate()  # written over a longer spare: cut to size
        except BaseException as e:
            self._error = e
        finally:
            self._file.close()

    async def put(self, chunk: bytes) -> None:
        if self._error is not None:  # e.g. the disk filled up: stop reading the upload
            raise self._error
        if len(chunk) >= self.BATCH:  # a bucket: as it is, once the one before is written
            await self._flush()
            await asyncio.to_thread(self._q.join)
            await asyncio.to_thread(self._q.put, chunk)
            return
        self._buf.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= self.BATCH:
            await self._flush()

    async def _flush(self) -> None:
        if self._buf:
            block = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
            self._buf, self._buffered = [], 0
            await asyncio.to_thread(self._q.put, block)

    async def finish(self) -> None:
        await self._flush()
        await asyncio.to_thread(self._q.put, None)
        await asyncio.to_thread(self._thread.join)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._buf.clear()
        self._q.put(None)
        self._thread.join()
