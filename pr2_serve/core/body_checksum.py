"""The checksum a weight upload carries: SHA-256 or XXH3-128 of the whole body.

An upload names at least one (HTTP headers ``X-Content-SHA256`` / ``X-Content-XXH128``, gRPC
``UpdateWeightsHeader.sha256`` / ``xxh128``, lowercase or uppercase hex); every one given is
checked once the last byte is in. It guards against a truncated, mixed or corrupted body, not an
attacker (who could change the header as well: the API key and TLS are for that), and XXH3-128
(``xxh128sum``'s hash) does that as well as SHA-256 at ~20 GB/s here against ~1.8: pr2's
clients send it, so an upload costs neither side a pass of SHA-256. SHA-256 stays for tools
that only have ``sha256sum``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import xxhash

__all__ = [
    "ALGORITHMS",
    "HEADERS",
    "BodyHasher",
    "ChecksumError",
    "declared_checksums",
    "hexdigest_of",
    "xxh128_of",
]

ALGORITHMS = {"sha256": (hashlib.sha256, 64), "xxh128": (xxhash.xxh3_128, 32)}
"""name (the proto field's) -> (hash constructor, hex digits)."""
HEADERS = {"sha256": "X-Content-SHA256", "xxh128": "X-Content-XXH128"}
"""name -> its HTTP header."""


class ChecksumError(ValueError):
    """A checksum missing, malformed or not matching the body; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def declared_checksums(**given: str | None) -> dict[str, str]:
    """``{algorithm: lowercase hex}`` of the checksums an upload declares (``sha256=...,
    xxh128=...``; empty or None: not given); :class:`ChecksumError` if none is, or one is not
    hex of its length."""
    out = {}
    for name, value in given.items():
        if not value:
            continue
        digits = ALGORITHMS[name][1]
        if len(value) != digits or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise ChecksumError(f"{name} must be {digits} hex digits of the body", name)
        out[name] = value.lower()
    if not out:
        raise ChecksumError("a hex sha256 or xxh128 of the body is required", "sha256")
    return out


class BodyHasher:
    """Hashes a body with every algorithm declared; :meth:`check` compares at the end."""

    def __init__(self, expected: dict[str, str]) -> None:
        self.expected = expected
        self._hashes = {name: ALGORITHMS[name][0]() for name in expected}

    def update(self, block) -> None:
        for h in self._hashes.values():
            h.update(block)

    def check(self) -> None:
        for name, h in self._hashes.items():
            got = h.hexdigest()
            if not hmac.compare_digest(got, self.expected[name]):
                raise ChecksumError(
                    f"{name} mismatch: body is {got}, header says {self.expected[name]}", name
                )


def hexdigest_of(algorithm: str, blocks: Iterable) -> str:
    """The ``algorithm`` hex digest of the concatenated ``blocks``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"checksum must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    h = ALGORITHMS[algorithm][0]()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def xxh128_of(blocks: Iterable) -> str:
    """The XXH3-128 hex digest of the concatenated ``blocks`` (what pr2's clients declare)."""
    return hexdigest_of("xxh128", blocks)
