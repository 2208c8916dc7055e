"""Content fingerprints of a model's weights: the same function on the server (over the files it
serves) and in the trainer (over the tensors it would push), so both can tell whether they hold
the same weights -- not only the same version number.

A tensor's digest covers its checkpoint name, shape and values as float32 (a bf16 checkpoint and
an fp32 trainer loaded from it agree); the fingerprint of a set is a hash of its digests in name
order. Policy and predictor are fingerprinted apart, and a predictor the checkpoint does not hold
counts as zeros of its shape (what the plugin serves then), so "no predictor" and "zero
predictor" agree. The server hashes a tensor once per file it comes from (cached), so a commit
costs one pass over the tensors it changed; a weight update hashes its files while the engine
applies them (:meth:`ServedFingerprints.compute`), off the push's critical path.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping

import torch
import xxhash

PREDICTOR_SUFFIX = ".mlp.predictor.weight"


def is_predictor(name: str) -> bool:
    return name.endswith(PREDICTOR_SUFFIX)


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """Digest of one tensor: name, shape and float32 values (XXH3-128, hashed in place: an fp32
    tensor is not copied). An identity check, not a security one (uploads carry a SHA-256 of
    their own): XXH3 runs at ~20 GB/s here, SHA-256 at ~1.8, and a server digests every tensor
    of every update."""
    h = xxhash.xxh3_128()
    h.update(name.encode())
    h.update(repr(tuple(tensor.shape)).encode())
    values = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    h.update(memoryview(values.view(torch.uint8).numpy()).cast("B"))
    return h.digest()


def combine(digests: Mapping[str, bytes]) -> str:
    """Fingerprint of a set of tensors from their digests (hex, 32 characters)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


def fingerprints(digests: Mapping[str, bytes]) -> dict[str, str]:
    """``{"policy": ..., "predictor": ...}`` of a whole model's digests."""
    policy = {n: d for n, d in digests.items() if not is_predictor(n)}
    predictor = {n: d for n, d in digests.items() if is_predictor(n)}
    return {"policy": combine(policy), "predictor": combine(predictor)}


def tensors_fingerprints(
    tensors: Mapping[str, torch.Tensor], predictor_shapes: Mapping[str, Iterable[int]]
) -> dict[str, str]:
    """Fingerprints of in-memory tensors in checkpoint names (the trainer's side); predictors
    missing from ``tensors`` count as zeros of their shape."""
    digests = {n: tensor_digest(n, t) for n, t in tensors.items()}
    for name, shape in predictor_shapes.items():
        if name not in digests:
            digests[name] = tensor_digest(name, torch.zeros(tuple(shape)))
    return fingerprints(digests)


class FileDigests:
    """Digests of tensors read from safetensors files, cached per (file, name) (server side)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], bytes] = {}

    def compute(self, files: Mapping[str, str]) -> dict[tuple[str, str], bytes]:
        """``{(file, name): digest}`` of the tensors of ``files`` not cached yet, without
        caching them (an update being applied: :meth:`remember` them once it is committed,
        so a refused file's digests never outlive it)."""
        from pr2_serve.core.tensor_files import iter_tensors

        todo = {n: p for n, p in files.items() if (p, n) not in self._cache}
        return {(todo[n], n): tensor_digest(n, t) for n, t in iter_tensors(todo)}

    def remember(self, digests: Mapping[tuple[str, str], bytes]) -> None:
        self._cache.update(digests)

    def digests(
        self, files: Mapping[str, str], predictor_shapes: Mapping[str, Iterable[int]]
    ) -> dict[str, bytes]:
        self._cache.update(self.compute(files))
        out = {n: self._cache[(p, n)] for n, p in files.items()}
        for name, shape in predictor_shapes.items():
            if name not in out:
                out[name] = tensor_digest(name, torch.zeros(tuple(shape)))
        return out

    def fingerprints(self, files, predictor_shapes) -> dict[str, str]:
        return fingerprints(self.digests(files, predictor_shapes))


class ServedFingerprints:
    """The fingerprints of what a server serves, computed once per weight version (the
    service asks when it commits one, never per request): ``{"weight_version", "policy",
    "predictor", "predictor_norm"}``."""

    def __init__(self, predictor_shapes: Mapping[str, Iterable[int]]) -> None:
        self._shapes = dict(predictor_shapes)
        self._digests = FileDigests()
        self._lock = threading.Lock()
        self._last: dict | None = None

    def compute(self, files: Mapping[str, str]) -> dict[tuple[str, str], bytes]:
        """Digests of an update's files, computed off the lock (see :meth:`FileDigests.compute`)."""
        return self._digests.compute(files)

    def remember(self, digests: Mapping[tuple[str, str], bytes]) -> None:
        with self._lock:
            self._digests.remember(digests)

    def get(self, version: int, files: Mapping[str, str]) -> dict:
        with self._lock:
            if self._last is None or self._last["weight_version"] != version:
                fp = self._digests.fingerprints(dict(files), self._shapes)
                norm = predictor_norm(files, self._shapes)
                self._last = {"weight_version": version, **fp, "predictor_norm": norm}
            return dict(self._last)


def predictor_norm(files: Mapping[str, str], predictor_shapes: Iterable[str]) -> float:
    """L2 norm of all predictor weights held in ``files`` (0: the server routes as plain R3)."""
    from safetensors import safe_open

    total = 0.0
    for name in predictor_shapes:
        if name in files:
            with safe_open(files[name], framework="pt") as f:
                total += float(f.get_tensor(name).double().pow(2).sum())
    return total**0.5
