"""Which paths ``POST /v1/weights/load/{version}`` may read (pure: no server)."""

from __future__ import annotations

import os

import pytest

from pr2_serve.service.errors import ApiError
from pr2_serve.service.load_path import files_to_load, resolve_load_path


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "allowed"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "model-00001.safetensors").write_bytes(b"x")
    (root / "ckpt" / "model-00002.safetensors").write_bytes(b"x")
    (root / "one.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", root / "escape.safetensors")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "one.safetensors", root / "inside.safetensors")
    return tmp_path, root


def refused(path: str, root, status: int = 403) -> str:
    with pytest.raises(ApiError) as e:
        resolve_load_path(path, None if root is None else str(root))
    assert (e.value.status, e.value.field) == (status, "path"), e.value.message
    return e.value.message


def test_paths_inside_the_weights_dir_are_accepted(tree):
    _, root = tree
    assert resolve_load_path("ckpt", str(root)) == root / "ckpt"
    assert resolve_load_path(str(root / "one.safetensors"), str(root)) == root / "one.safetensors"
    assert resolve_load_path("inside.safetensors", str(root)) == root / "one.safetensors"
    files = files_to_load(root / "ckpt", str(root))
    assert [f.name for f in files] == ["model-00001.safetensors", "model-00002.safetensors"]


def test_paths_outside_it_are_refused_naming_the_rule(tree):
    tmp, root = tree
    assert "'..'" in refused("../secret.safetensors", root)
    assert "'..'" in refused("ckpt/../../secret.safetensors", root)
    assert "outside --weights-dir" in refused(str(tmp / "secret.safetensors"), root)
    assert "symlinks are followed" in refused("escape.safetensors", root)
    assert "outside" in refused("up/secret.safetensors", root)
    assert "--weights-dir" in refused("one.safetensors", None)  # the flag is absent
    refused("missing.safetensors", root, 404)
    refused("", root, 400)
    with pytest.raises(ApiError) as e:
        files_to_load(root / "notes.txt", str(root))
    assert e.value.status == 400


def test_a_directory_means_the_files_every_reader_takes(tmp_path):
    """The one rule of ``pr2_serve.core.served_checkpoint.weight_files``: a trainer
    ``checkpoint-N`` is its
    ``model.safetensors`` (not the optimizer and RNG states beside it); a sharded checkpoint is
    the files of its index, each inside --weights-dir; a directory without weights is a 400."""
    import json

    root = tmp_path / "allowed"
    ckpt = root / "checkpoint-1"
    ckpt.mkdir(parents=True)
    for name in ("model", "optimizer", "trainer_state"):
        (ckpt / f"{name}.safetensors").write_bytes(b"x")
    assert files_to_load(ckpt, str(root)) == [(ckpt / "model.safetensors").resolve()]
    sharded = root / "sharded"
    sharded.mkdir()
    for name in ("a", "b", "stray"):
        (sharded / f"{name}.safetensors").write_bytes(b"x")
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "a.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    got = files_to_load(sharded, str(root))
    assert got == [(sharded / "a.safetensors").resolve(), (sharded / "b.safetensors").resolve()]
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    index["weight_map"]["w"] = "../../secret.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ApiError) as e:
        files_to_load(sharded, str(root))
    assert e.value.status == 403 and "outside --weights-dir" in e.value.message
    empty = root / "empty"
    empty.mkdir()
    with pytest.raises(ApiError) as e:
        files_to_load(empty, str(root))
    assert e.value.status == 400 and e.value.field == "path"
