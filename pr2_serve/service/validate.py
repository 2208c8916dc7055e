"""Checks of a generate request against the served model and the server's limits.

Pure: a :class:`GenerateRequest` (already shape-checked by its schema), the engine's
:class:`EngineInfo`, the :class:`Limits` and a tokenize function in; token-id prompts and a
:class:`Sampling` out, or an :class:`ApiError` naming the field at fault. Both protocols go
through :func:`validate`, so they refuse the same requests with the same field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

from pr2_serve.api.schemas import GenerateRequest
from pr2_serve.core.types import EngineInfo, Sampling
from pr2_serve.server.server_config import Limits
from pr2_serve.service.errors import ApiError

__all__ = [
    "check_limits",
    "check_min_version",
    "check_sampling",
    "prompt_ids",
    "sampling",
    "validate",
]

Tokenize = Callable[[str], list[int]]


def _invalid(message: str, field: str) -> ApiError:
    return ApiError(400, "invalid_argument", message, field)


def check_min_version(req: GenerateRequest, serving_version: int) -> None:
    """409 on ``min_weight_version`` when the server serves an older version."""
    if req.min_weight_version > serving_version:
        raise ApiError(
            409,
            "failed_precondition",
            f"serving weight version {serving_version} < "
            f"min_weight_version {req.min_weight_version}",
            "min_weight_version",
        )


def check_sampling(req: GenerateRequest, info: EngineInfo) -> None:
    """Sampling settings the model cannot honour: context length, greedy ``n > 1``,
    ``top_k`` and stop tokens outside the vocabulary."""
    if req.max_tokens >= info.max_model_len:
        raise _invalid(
            f"max_tokens {req.max_tokens} >= max_model_len {info.max_model_len}", "max_tokens"
        )
    if req.temperature == 0 and req.n > 1:
        raise _invalid(
            f"n {req.n} > 1 with temperature 0 (greedy): vLLM samples greedy requests "
            "once; use n=1, or top_k=1 with temperature > 0 for n greedy samples",
            "n",
        )
    if req.top_k > info.vocab_size:
        raise _invalid(f"top_k {req.top_k} > vocabulary size {info.vocab_size}", "top_k")
    for i, t in enumerate(req.stop_token_ids):
        if not 0 <= t < info.vocab_size:
            raise _invalid(f"token id {t} outside the vocabulary", f"stop_token_ids[{i}]")


def check_limits(req: GenerateRequest, limits: Limits) -> None:
    """Per-request limits: samples (prompts x n) and tokens (samples x max_tokens)."""
    samples = len(req.prompts) * req.n
    if samples > limits.max_samples_per_request:
        raise _invalid(
            f"{len(req.prompts)} prompts x n={req.n} = {samples} samples exceeds "
            f"the limit {limits.max_samples_per_request}",
            "n",
        )
    if samples * req.max_tokens > limits.max_tokens_per_request:
        raise _invalid(
            f"{samples} samples x max_tokens={req.max_tokens} exceeds the limit "
            f"{limits.max_tokens_per_request} tokens per request",
            "max_tokens",
        )


def prompt_ids(req: GenerateRequest, info: EngineInfo, tokenize: Tokenize) -> list[list[int]]:
    """Every prompt as token ids (text through ``tokenize``): non-empty, inside the
    vocabulary, and leaving room for ``max_tokens`` in the context."""
    prompts: list[list[int]] = []
    for i, p in enumerate(req.prompts):
        ids = p if isinstance(p, list) else tokenize(p)
        if not ids:
            raise _invalid("empty prompt", f"prompts[{i}]")
        for j, t in enumerate(ids):
            if not 0 <= t < info.vocab_size:
                raise _invalid(
                    f"token id {t} outside the vocabulary [0, {info.vocab_size})",
                    f"prompts[{i}][{j}]",
                )
        if len(ids) + req.max_tokens > info.max_model_len:
            raise _invalid(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) "
                f"exceeds max_model_len {info.max_model_len}",
                f"prompts[{i}]",
            )
        prompts.append(list(ids))
    return prompts


def sampling(req: GenerateRequest) -> Sampling:
    """The engine's sampling settings of a request: its fields named like :class:`Sampling`'s
    (a dialect's subclass of the request adds some, e.g. ``stop`` and ``min_p``)."""
    names = {f.name for f in fields(Sampling)} & set(type(req).model_fields)
    same = req.model_dump(include=names)
    return Sampling(**{k: tuple(v) if isinstance(v, list) else v for k, v in same.items()})


def validate(
    req: GenerateRequest,
    info: EngineInfo,
    limits: Limits,
    tokenize: Tokenize,
    serving_version: int,
) -> tuple[list[list[int]], Sampling]:
    """Every check in order (the first failure is reported); the engine's inputs."""
    check_min_version(req, serving_version)
    check_sampling(req, info)
    check_limits(req, limits)
    return prompt_ids(req, info, tokenize), sampling(req)
