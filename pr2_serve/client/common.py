"""What both clients share: the error and result types (the body of a push: :mod:`.payload`)."""

from __future__ import annotations

from dataclasses import dataclass

from pr2_serve.core.types import Rollout

#: How long a liveness or readiness probe waits for an answer: a hung server (a stopped process,
#: a black-holed network) never answers, and a probe must not block for a call's long timeout.
PROBE_TIMEOUT_S = 5.0


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
