"""The whole route protocol: which request a row belongs to, how many rows, their dtype, their
encodings on the wires (ours, vLLM's ``.npy``, SGLang's int32), and what a valid route array is.
Pure numpy (torch only for the capture buffer's dtype, imported lazily).

**Keys.** The engine submits prompt ``i`` of a job as vLLM request ``request_id(job, i)``
(``"<job>.<i>"``); vLLM names the ``n`` children of that request ``"<child>_<request id>"``;
the worker stores each child's rows under ``store_key(request id, child)``
(``"<job>.<i>/<child>"``), and the engine takes them back under the same key.

**Rows.** A route array has shape ``[rows, num_moe_layers, top_k]``: row ``i`` holds the expert
ids used at token position ``i`` (prompt and generated tokens; the last sampled token is never
forwarded, so a sequence of ``P + O`` tokens has ``P + O - 1`` rows). Ids are stored as uint8 when
the model has at most 256 experts, else uint16 -- the same as vLLM's native
``CompletionOutput.routed_experts``. On the wire the array travels as little-endian raw bytes plus
dtype and shape (4x smaller than base64 of int32, SGLang's format, before base64 itself).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EncodedRoutes",
    "capture_dtype",
    "child_index",
    "decode_routes",
    "encode_routes",
    "int32_base64",
    "npy_base64",
    "prompt_index",
    "request_id",
    "route_dtype",
    "route_rows",
    "store_key",
    "validate_routes",
]

_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}


# -- keys ------------------------------------------------------------------------------------------
def request_id(job_key: str, prompt_index: int) -> str:
    """vLLM request id of prompt ``prompt_index`` of job ``job_key``: ``"<job>.<i>"``."""
    return f"{job_key}.{prompt_index}"


def prompt_index(req_id: str) -> int:
    """Inverse of :func:`request_id`: the prompt index of a request id."""
    return int(req_id.rsplit(".", 1)[1])


def child_index(internal_request_id: str) -> int:
    """Which of the ``n`` samples a vLLM worker request is: vLLM names the children of a
    parallel-sampling request ``"<i>_<parent id>"``; a request with ``n == 1`` is child 0."""
    head, sep, _ = internal_request_id.partition("_")
    return int(head) if sep and head.isdigit() else 0


def store_key(req_id: str, sample_index: int) -> str:
    """Route-store key of sample ``sample_index`` of request ``req_id``: ``"<job>.<i>/<s>"``."""
    return f"{req_id}/{sample_index}"


# -- rows and dtypes -------------------------------------------------------------------------------
def route_rows(prompt_len: int, output_len: int) -> int:
    """Rows of a sample's route array: every position but the last sampled token's, which is
    never forwarded."""
    return prompt_len + output_len - 1


def capture_dtype(num_experts: int):
    """torch dtype of the plugin's per-step capture buffer (signed: it receives top-k indices
    by a slice copy; narrowed to :func:`route_dtype` on the host)."""
    import torch

    return torch.int16 if num_experts <= 32767 else torch.int32


def route_dtype(num_experts: int) -> np.dtype:
    """``uint8`` for up to 256 experts, ``uint16`` up to 65536."""
    if not 0 < num_experts <= 65536:
        raise ValueError(f"num_experts must be in 1..65536, got {num_experts}")
    return _DTYPES["uint8"] if num_experts <= 256 else _DTYPES["uint16"]


@dataclass(frozen=True, slots=True)
class EncodedRoutes:
    """A route array as raw little-endian bytes + dtype name + shape."""

    dtype: str
    shape: tuple[int, int, int]
    data: bytes

    def to_json(self) -> dict:
        """JSON form: ``{"dtype": "uint8", "shape": [r, l, k], "data": "<base64>"}``."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_json(cls, obj: dict) -> EncodedRoutes:
        return cls(str(obj["dtype"]), tuple(obj["shape"]), base64.b64decode(obj["data"]))


def encode_routes(routes: np.ndarray, start: int = 0) -> EncodedRoutes:
    """Encode rows ``start:`` of a ``[rows, layers, k]`` route array."""
    if routes.ndim != 3:
        raise ValueError(f"routes must be 3-D [rows, layers, k], got shape {routes.shape}")
    if routes.dtype.name not in _DTYPES:
        raise ValueError(f"routes dtype must be uint8 or uint16, got {routes.dtype}")
    part = np.ascontiguousarray(routes[max(start, 0) :], dtype=_DTYPES[routes.dtype.name])
    return EncodedRoutes(routes.dtype.name, tuple(int(s) for s in part.shape), part.tobytes())


def decode_routes(enc: EncodedRoutes) -> np.ndarray:
    """Inverse of :func:`encode_routes`; checks that the byte count matches dtype and shape."""
    if enc.dtype not in _DTYPES:
        raise ValueError(f"unknown route dtype {enc.dtype!r}")
    if len(enc.shape) != 3 or any(int(s) < 0 for s in enc.shape):
        raise ValueError(f"route shape must be [rows, layers, k], got {enc.shape}")
    dtype = _DTYPES[enc.dtype]
    expected = int(np.prod(enc.shape)) * dtype.itemsize
    if len(enc.data) != expected:
        raise ValueError(
            f"route data has {len(enc.data)} bytes, shape {enc.shape} needs {expected}"
        )
    return np.frombuffer(enc.data, dtype=dtype).reshape(enc.shape).astype(dtype.newbyteorder("="))


def npy_base64(routes: np.ndarray, start: int = 0) -> str:
    """vLLM's ``routed_experts``: base64 of ``np.save(rows[start:], allow_pickle=False)`` (the
    array's own dtype and shape; decode with ``np.load(io.BytesIO(b64decode(s)),
    allow_pickle=False)``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(routes[max(start, 0) :]), allow_pickle=False)
    return base64.b64encode(buf.getbuffer()).decode("ascii")


def int32_base64(routes: np.ndarray, start: int = 0) -> str:
    """SGLang's ``routed_experts`` (what slime and miles decode): base64 of rows ``start:`` as
    flat little-endian int32, to be reshaped by the reader to ``(rows, layers, top_k)``."""
    return base64.b64encode(np.ascontiguousarray(routes[max(start, 0) :], "<i4").tobytes()).decode(
        "ascii"
    )


def validate_routes(
    routes: np.ndarray,
    num_layers: int,
    top_k: int,
    num_experts: int,
    num_rows: int | None = None,
) -> None:
    """Raise ``ValueError`` unless ``routes`` is ``[num_rows, num_layers, top_k]`` with ids < E
    and no repeated expert within a row (the signature of a hole filled with zeros is a row of
    identical ids)."""
    if routes.ndim != 3 or routes.shape[1:] != (num_layers, top_k):
        raise ValueError(f"routes shape {routes.shape} != [rows, {num_layers}, {top_k}]")
    if num_rows is not None and routes.shape[0] != num_rows:
        raise ValueError(f"routes have {routes.shape[0]} rows, the sample needs {num_rows}")
    if routes.size and int(routes.max()) >= num_experts:
        raise ValueError(f"route id {int(routes.max())} >= num_experts {num_experts}")
    if top_k > 1 and routes.size:
        s = np.sort(routes, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            raise ValueError("a route row repeats an expert id (missing rows filled with zeros?)")
