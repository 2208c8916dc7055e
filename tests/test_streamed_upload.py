"""An upload applied as it arrives (``pr2_serve.service.streamed_upload``) and the handoff to the
engine thread (``pr2_serve.engine.bucket_handoff``), with a stand-in engine: what reaches the
engine, when, and what a broken body leaves. No vLLM engine (the real server's side is in
``test_streamed_upload_serve``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from safetensors.torch import load, save

from pr2_serve.core import reused_buffers
from pr2_serve.core.body_checksum import BodyHasher, xxh128_of
from pr2_serve.core.fingerprint import tensor_digest
from pr2_serve.core.served_checkpoint import WeightValidationError
from pr2_serve.engine import bucket_handoff
from pr2_serve.engine.bucket_handoff import BucketHandoff, UploadStalled
from pr2_serve.service import streamed_upload
from pr2_serve.service.errors import ApiError
from pr2_serve.service.streamed_upload import StreamedUpload
from pr2_serve.service.weight_store import HashingWriter, WeightStore

BUCKET = 4096


def _body() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({f"layer.{i}.weight": torch.randn(32, 32, generator=g) for i in range(6)})


class FakeEngine:
    """Takes any tensor; ``check_tensor`` refuses the names in ``unknown``."""

    def __init__(self, unknown=()) -> None:
        self.unknown = set(unknown)

    def check_tensor(self, name, shape, dtype) -> None:
        if name in self.unknown:
            raise WeightValidationError(f"unknown tensor name {name!r}")


class FakeLlm:
    """The engine thread's ``llm``: records the buckets it is handed (``refuse``: the index of
    a bucket whose check fails); ``first`` is set when one arrives."""

    def __init__(self, refuse: int | None = None) -> None:
        self.buckets: list[list] = []
        self.first = threading.Event()
        self.refuse = refuse

    def collective_rpc(self, fn, args=()):
        if len(self.buckets) == self.refuse:
            raise WeightValidationError("bucket refused")
        self.buckets.append(args[0])
        self.first.set()


async def _run(upload: StreamedUpload, chunks, llm: FakeLlm):
    """The update as the service and the engine run it: stage, the feed and the confirm on a
    thread, settle; ``(the engine side's error, digests, files, bytes)``."""
    files, feed, confirm, size, _split = await upload.stage(chunks)
    try:
        await asyncio.to_thread(feed, llm)
        await asyncio.to_thread(confirm, llm, True)  # after the canary
        error = None
    except Exception as e:
        await asyncio.to_thread(confirm, llm, False)
        error = e
    return error, await upload.settle(), files, size


def _upload(tmp_path, body: bytes, engine=None, **kw) -> StreamedUpload:
    store = WeightStore(tmp_path, 64 << 20)
    checks = {"xxh128": kw.pop("xxh128", xxh128_of([body]))}
    return StreamedUpload(store, engine or FakeEngine(), 1, checks, len(body), BUCKET, **kw)


async def _chunks(body: bytes, size: int = 1000, wait=None, at: int | None = None):
    for i in range(0, len(body), size):
        if at is not None and i >= at and wait is not None:
            await wait()
            wait = None
        yield body[i : i + size]


def test_buckets_are_applied_while_the_body_is_still_arriving(tmp_path):
    """The body's second half is only sent once the engine holds a bucket: without the overlap
    (receive everything, then apply) this would never finish."""
    body, llm = _body(), FakeLlm()
    upload = _upload(tmp_path, body)

    async def engine_has_a_bucket():
        while not llm.first.is_set():
            await asyncio.sleep(0.01)

    async def main():
        chunks = _chunks(body, wait=engine_has_a_bucket, at=len(body) // 2)
        return await asyncio.wait_for(_run(upload, chunks, llm), 30)

    error, digests, files, size = asyncio.run(main())
    assert error is None and size == len(body)
    expected = load(body)
    got = {n: t for bucket in llm.buckets for n, t in bucket}
    assert len(llm.buckets) > 2 and set(got) == set(expected) == set(files)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    final = upload.final
    assert final.read_bytes() == body and files == dict.fromkeys(expected, str(final))
    assert digests == {(str(final), n): tensor_digest(n, t) for n, t in expected.items()}


def test_at_most_two_buckets_exist_at_once_even_on_a_slow_disk(tmp_path, monkeypatch):
    """The engine copies each bucket out as it loads it (as the live update does on the CPU)
    and the disk writes slowly: a bucket's buffer is let go once applied and written, and the
    next one is begun only once the one before is handed on, so two buffers serve them all."""

    made, applied = [], []
    mapped = reused_buffers.mapped_bytes

    class CopyingLlm:
        def collective_rpc(self, fn, args=()):
            applied.append({n: t.clone() for n, t in args[0]})

    slow_update = BodyHasher.update
    monkeypatch.setattr(reused_buffers, "mapped_bytes", lambda n: made.append(n) or mapped(n))
    monkeypatch.setattr(HashingWriter, "BATCH", BUCKET)  # each bucket goes as it is
    monkeypatch.setattr(BodyHasher, "update", lambda h, b: (time.sleep(0.02), slow_update(h, b)))
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.weight": torch.randn(32, 32, generator=g) for i in range(16)}
    body = save(tensors)
    upload = _upload(tmp_path, body)
    error, *_ = asyncio.run(_run(upload, _chunks(body, size=3000), CopyingLlm()))
    assert error is None and len(applied) == 8 and upload.final.read_bytes() == body
    got = {n: t for bucket in applied for n, t in bucket.items()}
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[n], t) for n, t in tensors.items())  # no bucket written over
    assert 1 <= len(made) <= 2, made  # 8 buckets


def test_a_bad_checksum_is_raised_on_the_engine_side_after_the_last_bucket(tmp_path):
    """(By ``confirm``, after the canary: the model is then restored.)"""
    body, llm = _body(), FakeLlm()
    upload = _upload(tmp_path, body, xxh128="0" * 32)
    error, digests, *_ = asyncio.run(_run(upload, _chunks(body), llm))
    assert isinstance(error, ApiError) and (error.status, error.field) == (400, "xxh128")
    assert "xxh128 mismatch" in str(error) and digests is None
    assert sum(len(b) for b in llm.buckets) == 6  # every bucket came: the check is at the end
    assert list((tmp_path / "weights").iterdir()) == []


def test_a_refused_bucket_stops_the_applying_and_the_rest_is_read_and_dropped(tmp_path):
    body, llm = _body(), FakeLlm(refuse=1)
    upload = _upload(tmp_path, body)
    read = []

    async def chunks():
        async for c in _chunks(body):
            read.append(len(c))
            yield c

    error, digests, *_ = asyncio.run(_run(upload, chunks(), llm))
    assert isinstance(error, WeightValidationError) and digests is None
    assert len(llm.buckets) == 1 and sum(read) == len(body)  # drained: the client gets an answer
    assert list((tmp_path / "weights").iterdir()) == []


def test_a_stalled_upload_is_given_up_on_both_sides(tmp_path, monkeypatch):
    monkeypatch.setattr(streamed_upload, "STALL_S", 0.5)
    body, llm = _body(), FakeLlm()
    upload = _upload(tmp_path, body)

    async def forever():
        await asyncio.sleep(3600)

    async def main():
        return await asyncio.wait_for(_run(upload, _chunks(body, wait=forever, at=9000), llm), 30)

    t0 = time.perf_counter()
    error, digests, *_ = asyncio.run(main())
    assert time.perf_counter() - t0 < 10
    assert isinstance(error, (UploadStalled, ApiError)) and digests is None
    assert upload._task.exception().status == 408
    assert list((tmp_path / "weights").iterdir()) == []


@pytest.mark.parametrize(
    "case, status, field, words",
    [
        ("unknown name", 400, "weights", "unknown tensor name 'layer.3.weight'"),
        ("declared size", 400, "body", "the safetensors header describes"),
        ("not safetensors", 400, "weights", "safetensors header"),
        ("short", 400, "body", "upload ended after"),
    ],
)
def test_a_body_refused_before_any_bucket_reaches_the_engine(tmp_path, case, status, field, words):
    body, llm = _body(), FakeLlm()
    engine = FakeEngine(unknown={"layer.3.weight"} if case == "unknown name" else ())
    upload = _upload(tmp_path, body, engine)
    if case == "declared size":
        upload.declared = len(body) + 1
    sent = {"not safetensors": b"\xff" * 64, "short": body[:100]}.get(case, body)
    with pytest.raises(ApiError) as e:
        asyncio.run(_run(upload, _chunks(sent), llm))
    assert (e.value.status, e.value.field) == (status, field) and words in str(e.value)
    assert llm.buckets == [] and list((tmp_path / "weights").iterdir()) == []


def test_the_handoff_holds_one_bucket_and_either_side_can_close_it():
    h = BucketHandoff()
    results = []
    t = threading.Thread(target=lambda: results.append(h.put("a")))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # waits until the engine takes it
    assert h.get(1) == "a"
    t.join(5)
    assert results == [True]
    t = threading.Thread(target=lambda: results.append(h.put("b")))
    t.start()
    time.sleep(0.1)
    h.close()  # the engine stopped: the receiver is released, told so
    t.join(5)
    assert results == [True, False] and h.put("c") is False
    with pytest.raises(UploadStalled, match="closed"):
        h.get(1)
    with pytest.raises(UploadStalled, match=r"no weights arrived for 0\.1 s"):
        BucketHandoff().get(0.1)


def test_the_feed_raises_what_the_receiver_put_and_closes():
    h, llm = BucketHandoff(), FakeLlm()
    feed = bucket_handoff.handoff_feed(h, 5)
    t = threading.Thread(target=lambda: [h.put([("x", torch.ones(1))]), h.put(ValueError("bad"))])
    t.start()
    with pytest.raises(ValueError, match="bad"):
        feed(llm)
    t.join(5)
    assert len(llm.buckets) == 1 and h.put("late") is False


def test_the_engine_never_fails_on_a_future_its_caller_cancelled():
    """A gRPC caller that goes away cancels its asyncio future, which cancels the engine's:
    setting that one's outcome must not stop the engine (it raised InvalidStateError)."""
    import concurrent.futures as cf

    from pr2_serve.engine.jobs import resolve

    fut = cf.Future()
    fut.cancel()
    resolve(fut, 1)
    resolve(fut, error=ValueError("x"))
    assert fut.cancelled()
    live = cf.Future()
    resolve(live, error=ValueError("y"))
    assert isinstance(live.exception(), ValueError)


def _load(tmp_path, body: bytes, engine=None) -> tuple[StreamedUpload, object]:
    """A one-file checkpoint loaded from ``tmp_path / "src"``, into a store whose upload limit
    is smaller than the file."""
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(body)
    store = WeightStore(tmp_path / "state", len(body) // 4)
    upload = StreamedUpload(store, engine or FakeEngine(), 1, {}, len(body), BUCKET, src)
    return upload, src


def test_a_loaded_file_is_applied_as_it_is_read_and_copied_past_the_upload_limit(tmp_path):
    """``POST /v1/weights/load`` of a one-file checkpoint: read once, in chunks, each bucket
    applied as it completes, the same bytes written to the version's file in the store; the
    upload limit is not a load's (the file is 4x over it)."""
    body, llm = _body(), FakeLlm()
    upload, src = _load(tmp_path, body)
    error, digests, files, size = asyncio.run(
        _run(upload, streamed_upload.file_chunks(src, 1000), llm)
    )
    expected = load(body)
    got = {n: t for bucket in llm.buckets for n, t in bucket}
    assert error is None and size == len(body) and len(llm.buckets) > 2
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert upload.final.read_bytes() == body and files == dict.fromkeys(expected, str(upload.final))
    final = str(upload.final)
    assert digests == {(final, n): tensor_digest(n, t) for n, t in expected.items()}


@pytest.mark.parametrize("case", ["short", "refused bucket"])
def test_a_bad_loaded_file_names_itself_and_is_not_read_on(tmp_path, case):
    """A truncated file is refused naming it (field ``path``); a file refused mid-way is not
    read to its end (an upload's body is, for the client's sake); no file is left."""
    g = torch.Generator().manual_seed(2)
    body = save({f"layer.{i}.weight": torch.randn(32, 32, generator=g) for i in range(30)})
    upload, src = _load(tmp_path, body)
    if case == "short":
        src.write_bytes(body[: len(body) // 2])
    llm, read = FakeLlm(refuse=1 if case == "refused bucket" else None), []

    async def chunks():
        async for c in streamed_upload.file_chunks(src, 1000):
            read.append(len(c))
            yield c

    error, digests, *_ = asyncio.run(_run(upload, chunks(), llm))
    if case == "short":
        assert isinstance(error, ApiError) and (error.status, error.field) == (400, "path")
        assert f"{src} ended after {len(body) // 2} bytes of {len(body)}" in str(error)
    else:
        assert isinstance(error, WeightValidationError) and sum(read) < len(body) / 2
    assert digests is None and list((tmp_path / "state" / "weights").iterdir()) == []
