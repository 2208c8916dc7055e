"""What both clients share: the error and result types, and the weight file a push sends."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..types import Rollout

CHUNK = 4 << 20


class ServerError(RuntimeError):
    """The server refused a request: ``status`` is the HTTP status or the gRPC code name;
    ``field`` names the request field at fault (both protocols), when there is one."""

    def __init__(self, status: int | str, message: str, field: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.field = status, message, field


@dataclass(slots=True)
class GenerateResult:
    weight_version: int
    samples: list[Rollout]


def weights_file(weights: Mapping[str, Any] | str | os.PathLike) -> tuple[Path, bool]:
    """A safetensors file for ``weights`` (written to a temp file for a state dict); the bool
    says whether the caller must delete it."""
    if isinstance(weights, (str, os.PathLike)):
        return Path(weights), False
    from safetensors.torch import save_file

    fd, name = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, name)
    return Path(name), True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    for block in file_chunks(path):
        h.update(block)
    return h.hexdigest()


def file_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


def push_result(res) -> dict:
    """A push's result as a dict (the HTTP JSON body, or a gRPC ``UpdateWeightsResponse``)."""
    keys = ("weight_version", "num_tensors", "seconds", "receive_seconds", "apply_seconds")
    if isinstance(res, dict):
        return res
    return {k: getattr(res, k) for k in keys}
