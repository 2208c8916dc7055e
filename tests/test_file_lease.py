"""``pr2_serve.core.file_lease.held_elsewhere``: the kernel's word on whether a file is open or
mapped anywhere else (what decides whether a removed version's file may be written over)."""

from __future__ import annotations

import mmap
import subprocess
import sys

from pr2_serve.core.file_lease import held_elsewhere


def test_a_file_nobody_holds_is_free(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    assert not held_elsewhere(path)
    assert not held_elsewhere(path)  # asking gave the lease back


def test_an_open_file_is_held(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    with open(path, "rb"):
        assert held_elsewhere(path)
    assert not held_elsewhere(path)


def test_a_mapping_holds_its_file_after_its_descriptor_is_closed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert held_elsewhere(path)
    view.close()
    assert not held_elsewhere(path)


def test_a_file_open_in_another_process_is_held(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    code = "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()"
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "open"
        assert held_elsewhere(path)
    finally:
        other.communicate("")
    assert not held_elsewhere(path)


def test_a_missing_file_counts_as_held(tmp_path):
    assert held_elsewhere(tmp_path / "absent")
