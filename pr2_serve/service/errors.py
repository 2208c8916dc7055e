"""The one error path of the rollout API, for HTTP and gRPC alike; no fastapi, grpc or torch.

- :class:`ApiError` is every refusal: an HTTP status, a kind (``invalid_argument``...), a
  message and, where one field of the request is at fault, that field (``prompts[0][3]``).
  Over HTTP it is the body ``{"error": {"type", "message", "field"}}`` (:meth:`ApiError.to_json`);
  over gRPC the status maps to a canonical code, the message is the details, and the type and
  field travel in the trailing metadata under :data:`TYPE_METADATA_KEY` and
  :data:`FIELD_METADATA_KEY`.
- :func:`from_engine` maps what the engine raises to an :class:`ApiError`;
  :func:`from_validation` maps a pydantic validation error (its ``errors()`` list);
  :func:`internal` is every other exception: a 500 ``internal`` in the same shape (no bare 500s).
"""

from __future__ import annotations

from collections.abc import Sequence

from pr2_serve.core.served_checkpoint import (
    CanaryError,
    NonFiniteWeightsError,
    StaleVersionError,
    WeightValidationError,
)
from pr2_serve.core.types import EngineStepError

__all__ = [
    "ENGINE_ERRORS",
    "FIELD_METADATA_KEY",
    "TYPE_METADATA_KEY",
    "ApiError",
    "from_engine",
    "from_validation",
    "internal",
]

FIELD_METADATA_KEY = "pr2-error-field"
"""gRPC trailing-metadata key carrying :attr:`ApiError.field` (clients read it back)."""
TYPE_METADATA_KEY = "pr2-error-type"
"""gRPC trailing-metadata key carrying :attr:`ApiError.kind` (``canary_failed``...)."""

ENGINE_ERRORS = (EngineStepError, ValueError)
"""What :func:`from_engine` maps (catch these around engine calls)."""


class ApiError(Exception):
    """A request the server refuses: ``status`` (HTTP) maps to a gRPC code in the gRPC layer."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field

    def to_json(self) -> dict:
        err = {"type": self.kind, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


def from_engine(e: BaseException) -> ApiError:
    """The API error for an exception of :data:`ENGINE_ERRORS`.

    A failed model step is a 500 ``engine_error`` (the engine serves on); a stale weight
    version a 409 on ``version``; weights that failed the canary a 409 ``canary_failed`` on
    ``weights`` (the previous weights serve on); NaN/Inf weights a 400 ``non_finite_weights``;
    any other refused weight file a 400 on ``weights``; any other ``ValueError`` (the engine's
    own request checks) a 400.
    """
    if isinstance(e, EngineStepError):
        return ApiError(500, "engine_error", str(e))
    if isinstance(e, StaleVersionError):
        return ApiError(409, "failed_precondition", str(e), "version")
    if isinstance(e, CanaryError):
        return ApiError(409, "canary_failed", str(e), "weights")
    if isinstance(e, NonFiniteWeightsError):
        return ApiError(400, "non_finite_weights", str(e), "weights")
    if isinstance(e, WeightValidationError):
        return ApiError(400, "invalid_argument", str(e), "weights")
    if isinstance(e, ValueError):
        return ApiError(400, "invalid_argument", str(e))
    raise TypeError(f"not an engine error: {e!r}")


def internal(e: BaseException) -> ApiError:
    """Any exception no rule above covers: a 500 ``internal`` naming its type (the server
    logs the traceback and serves on)."""
    if isinstance(e, ApiError):
        return e
    return ApiError(500, "internal", f"internal error: {type(e).__name__}: {e}"[:2000])


def from_validation(errors: Sequence[dict]) -> ApiError:
    """The API error for pydantic's ``errors()`` of a request: the first error, its location
    as the field (``prompts[0][2]``; a leading ``body`` is dropped). Unparsable JSON is a
    400 ``malformed_json``, anything else a 422 ``invalid_argument``."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        at = loc[0] if loc else "?"
        return ApiError(400, "malformed_json", f"malformed JSON body at byte {at}")
    field = loc[0] + "".join(f"[{x}]" for x in loc[1:]) if loc else None
    msg = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return ApiError(422, "invalid_argument", msg, field)
