"""Pushed weights on disk (``pr2_serve.service.weight_store``): uploads, commits, restart. No
engine."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json

import pytest

from pr2_serve.service.errors import ApiError
from pr2_serve.service.weight_store import COMMITTED, WeightStore, storage_error

BLOB = bytes(range(256)) * 40_000  # ~10 MiB: several writer batches
SHA = hashlib.sha256(BLOB).hexdigest()


async def _chunks(data: bytes, size: int = 1 << 20, fail_after: int | None = None):
    for i in range(0, len(data), size):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError("client went away")  # e.g. ClientDisconnect
        yield data[i : i + size]


def receive(store: WeightStore, version: int, data: bytes = BLOB, sha: str = SHA, **kw):
    declared = kw.pop("declared", len(data))
    return asyncio.run(store.receive(_chunks(data, **kw), version, sha, declared))


def files(store: WeightStore) -> set[str]:
    return {p.name for p in store.weights_dir.iterdir()}


def test_upload_commit_restore(tmp_path):
    store = WeightStore(tmp_path, 64 << 20, keep_versions=1)
    assert store.committed() is None
    path, size = receive(store, 1, sha=SHA.upper())
    assert (path.name, size, path.read_bytes() == BLOB) == ("v1.safetensors", len(BLOB), True)
    store.commit({"a": str(path), "b": str(path)}, 1)
    path2, _ = receive(store, 2, b"x" * 10, hashlib.sha256(b"x" * 10).hexdigest())
    store.commit({"b": str(path2)}, 2)  # on top of v1: a still from v1
    record = json.loads((tmp_path / COMMITTED).read_text())
    assert record["version"] == 2 and record["history"] == []
    assert record["files"] == {"a": "v1.safetensors", "b": "v2.safetensors"}
    again = WeightStore(tmp_path, 64 << 20, keep_versions=1)  # a restarted server
    assert again.committed() == (
        {
            "a": str(again.weights_dir / "v1.safetensors"),
            "b": str(again.weights_dir / "v2.safetensors"),
        },
        2,
    )
    path3, _ = receive(store, 3)
    store.commit({"a": str(path3), "b": str(path3)}, 3)
    assert files(store) == {"v3.safetensors"}  # nothing refers to v1, v2 any more


def _push(store: WeightStore, version: int, names: list[str]) -> None:
    data = f"v{version}".encode()
    path, _ = receive(store, version, data, hashlib.sha256(data).hexdigest())
    store.commit(dict.fromkeys(names, str(path)), version)


def test_keeps_the_last_n_versions_and_rolls_back_to_one(tmp_path):
    store = WeightStore(tmp_path, 64 << 20)  # default: the committed version + 1 before it
    _push(store, 1, ["a", "b"])
    _push(store, 2, ["b"])
    _push(store, 3, ["a"])
    assert [v for v, _ in store.kept()] == [3, 2]
    w = store.weights_dir
    assert dict(store.kept())[2] == {"a": str(w / "v1.safetensors"), "b": str(w / "v2.safetensors")}
    assert files(store) == {"v1.safetensors", "v2.safetensors", "v3.safetensors"}
    # a rollback: version 4 is exactly version 2's set (replace), v3 stays kept
    store.commit(dict(store.kept())[2], 4, replace=True, source="rollback to 2")
    assert [v for v, _ in store.kept()] == [4, 3]
    assert store.committed() == (dict(store.kept())[4], 4)
    assert dict(store.kept())[4] == dict(WeightStore(tmp_path, 1).kept())[4]
    assert json.loads((tmp_path / COMMITTED).read_text())["source"] == "rollback to 2"
    _push(store, 5, ["b"])  # v3 falls out: its file goes
    assert [v for v, _ in store.kept()] == [5, 4]
    assert files(store) == {"v1.safetensors", "v2.safetensors", "v5.safetensors"}
    store3 = WeightStore(tmp_path, 64 << 20, keep_versions=3)
    _push(store3, 6, ["a"])
    assert [v for v, _ in store3.kept()] == [6, 5, 4]


def test_a_removed_version_is_written_over_by_the_next_upload(tmp_path):
    """The file a commit removes is kept as a spare, and the next upload is written into it
    (its pages are still cached: no new ones to find and zero), cut to the upload's size."""
    store = WeightStore(tmp_path, 64 << 20, keep_versions=1)
    _push(store, 1, ["a"])
    path, _ = receive(store, 2)
    store.commit({"a": str(path)}, 2)  # v1 goes: it becomes the spare
    spare = store.spare_dir / "0"
    assert files(store) == {"v2.safetensors"} and spare.read_bytes() == b"v1"
    v1, inode = spare.stat().st_ino, path.stat().st_ino
    _push(store, 3, ["a"])  # written over the spare: v1's file
    assert (store.weights_dir / "v3.safetensors").stat().st_ino == v1
    assert (store.weights_dir / "v3.safetensors").read_bytes() == b"v3"
    assert spare.stat().st_ino == inode  # v2's file (~10 MiB), removed by that commit
    short = b"x" * 10
    path4, size = receive(store, 4, short, hashlib.sha256(short).hexdigest())
    assert (path4.stat().st_ino, path4.read_bytes(), size) == (inode, short, 10)
    assert not spare.exists()
    store.commit({"a": str(path4)}, 4)
    store.reset()
    assert not store.spare_dir.exists() and files(store) == set()


def test_a_removed_version_a_reader_maps_is_not_written_over(tmp_path):
    """A reader that mapped a version's file (``safetensors.load_file``) keeps its tensors
    after the commit that removes that version: the spare it became is held, so the next
    upload goes into a new file and the spare is let go (the reader keeps its inode)."""
    import torch
    from safetensors.torch import load_file, save_file

    store = WeightStore(tmp_path, 64 << 20, keep_versions=1)
    blob = tmp_path / "blob.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(blob))
    data = blob.read_bytes()
    path1, _ = receive(store, 1, data, hashlib.sha256(data).hexdigest())
    store.commit({"w": str(path1)}, 1)
    mapped = load_file(str(path1))  # its tensors map v1's file
    _push(store, 2, ["w"])  # v1 goes: its file becomes the spare, still mapped
    v1 = (store.spare_dir / "0").stat().st_ino
    path3, _ = receive(store, 3)  # ~10 MiB of other bytes: not over v1's file
    assert path3.stat().st_ino != v1 and path3.read_bytes() == BLOB
    assert not (store.spare_dir / "0").exists()
    assert torch.equal(mapped["w"], torch.arange(1000.0))


def test_reset_forgets_every_commit(tmp_path):
    store = WeightStore(tmp_path, 64 << 20)
    _push(store, 1, ["a"])
    store.reset()
    assert store.committed() is None and store.kept() == [] and files(store) == set()


def test_an_old_record_without_history_still_restores(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "v1.safetensors").write_bytes(b"x")
    (tmp_path / COMMITTED).write_text(json.dumps({"version": 1, "files": {"a": "v1.safetensors"}}))
    store = WeightStore(tmp_path, 64 << 20)
    store.clean()
    assert store.committed() == ({"a": str(store.weights_dir / "v1.safetensors")}, 1)


@pytest.mark.parametrize(
    "kw, status, kind, field",
    [
        ({"sha": "0" * 64}, 400, "invalid_argument", "sha256"),
        ({"declared": len(BLOB) + 1}, 400, "invalid_argument", "body"),
        ({"fail_after": 3 << 20}, 400, "upload_interrupted", "body"),
        ({"data": BLOB * 7}, 413, "resource_exhausted", None),
    ],
)
def test_a_refused_upload_leaves_no_file(tmp_path, kw, status, kind, field):
    store = WeightStore(tmp_path, 64 << 20)
    with pytest.raises(ApiError) as e:
        receive(store, 1, **kw)
    assert (e.value.status, e.value.kind, e.value.field) == (status, kind, field)
    assert files(store) == set()


def test_refused_from_the_headers(tmp_path):
    store = WeightStore(tmp_path, 100)
    for sha in (None, "", "abc"):
        with pytest.raises(ApiError) as e:
            store.check_declared(sha, 10)
        assert (e.value.status, e.value.field) == (400, "sha256")
    with pytest.raises(ApiError) as e:
        store.check_declared(SHA, 101)
    assert e.value.status == 413
    store.check_declared(SHA, 100)
    store.check_declared(SHA, None)


def test_clean_removes_partial_and_uncommitted_files(tmp_path):
    store = WeightStore(tmp_path, 64 << 20)
    path, _ = receive(store, 1)
    store.commit({"a": str(path)}, 1)
    (store.weights_dir / ".v2-1234abcd.part").write_bytes(b"half")  # killed mid-upload
    (store.weights_dir / "v2.safetensors").write_bytes(b"x")  # killed mid-apply
    WeightStore(tmp_path, 64 << 20).clean()
    assert files(store) == {"v1.safetensors"}
    store.discard(1)  # discard is only ever called for an uncommitted version
    assert files(store) == set()


def test_storage_errors():
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        e = storage_error(OSError(code, "No space left on device"))
        assert isinstance(e, ApiError) and (e.status, e.kind) == (507, "insufficient_storage")
    other = OSError(errno.EIO, "I/O error")
    assert storage_error(other) is other
