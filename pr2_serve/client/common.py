"""What both clients share: the error and result types (the body of a push: :mod:`.payload`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..types import Rollout


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


def push_result(res) -> dict:
    """A push's result as a dict (the HTTP JSON body, or a gRPC ``UpdateWeightsResponse``)."""
    keys = ("weight_version", "num_tensors", "seconds", "receive_seconds", "apply_seconds")
    if isinstance(res, dict):
        return res
    return {k: getattr(res, k) for k in keys}
