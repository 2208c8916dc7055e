"""Which paths ``POST /v1/weights/load/{version}`` may read (pure: no server)."""

from __future__ import annotations

import os

import pytest

from pr2_serve.api.errors import ApiError
from pr2_serve.api.load_path import checkpoint_files, resolve_load_path


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
    files = checkpoint_files(root / "ckpt")
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
        checkpoint_files(root / "notes.txt")
    assert e.value.status == 400
