"""What the ecosystem dialects (OpenAI-compatible and SGLang-compatible routes) share over the
one :class:`~.service.RolloutService`: nothing here talks HTTP.

A dialect turns its request into a :class:`DialectRequest` -- our
:class:`~.schemas.GenerateRequest` plus the sampling settings only the dialects use (stop
strings, ``min_p``, top log-probs, prompt log-probs, text) -- and hands it to
``service.generate`` / ``service.stream``. So the same admission, validation, limits, metrics
and version semantics apply to every dialect; :func:`~.validate.sampling` carries every request
field named like a :class:`~pr2_serve.core.types.Sampling` field to the engine.

Errors stay :class:`~.errors.ApiError` s; :func:`rename_field` translates the field they name
into the dialect's parameter name (``prompts[0][3]`` -> ``prompt[0][3]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import ConfigDict, Field, StrictBool, StrictStr, ValidationError

from pr2_serve.api.schemas import GenerateRequest
from pr2_serve.service.errors import ApiError, from_validation

__all__ = [
    "MAX_LOGPROBS",
    "SSE_DONE",
    "DialectRequest",
    "build_request",
    "decode_tokens",
    "rename_field",
    "sse",
]

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOP = 64
SSE_DONE = "data: [DONE]\n\n"


class DialectRequest(GenerateRequest):
    """A generate request with the dialects' extra sampling settings (internal: never parsed
    from a wire directly, so it stays out of the OpenAPI spec)."""

    model_config = ConfigDict(extra="forbid")

    stop: list[StrictStr] = Field(default_factory=list, max_length=MAX_STOP)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    top_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    detokenize: StrictBool = False


def rename_field(field: str | None, names: Mapping[str, str]) -> str | None:
    """``field`` with its leading name translated by ``names`` (``prompts[1]`` ->
    ``prompt[1]``); unknown names stay."""
    if field is None:
        return None
    head, sep, rest = field.partition("[")
    return names.get(head, head) + sep + rest


def build_request(names: Mapping[str, str], **fields) -> DialectRequest:
    """``DialectRequest(**fields)``; a value it refuses is a 400 naming the dialect's
    parameter (``names`` maps our field names to the dialect's)."""
    try:
        return DialectRequest(**fields)
    except ValidationError as e:
        err = from_validation(e.errors())
        field = rename_field(err.field, names)
        message = err.message.replace(err.field, field, 1) if err.field else err.message
        raise ApiError(400, "invalid_argument", message, field) from e


def decode_tokens(tokenizer, ids, as_ids: bool) -> list[str]:
    """Each token as text (vLLM's ``tokenizer.decode([id])``), or ``"token_id:<id>"``
    (``return_tokens_as_token_ids``: every token identifiable, whatever its bytes)."""
    if as_ids:
        return [f"token_id:{t}" for t in ids]
    return [tokenizer.decode([t]) for t in ids]


def sse(obj) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(obj)}\n\n"
