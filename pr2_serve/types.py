"""The values that cross the engine, the API and the clients: no torch, no vLLM.

Everything is built with keywords (``Rollout(prompt_index=0, ...)``), so a field added later
cannot silently shift the others. The clients and the API import these, never the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EngineInfo",
    "EngineStepError",
    "RequestRejected",
    "Rollout",
    "Sampling",
    "StreamEvent",
    "UpdateResult",
]


class RequestRejected(ValueError):
    """vLLM refused a request when it was added (its own validation)."""


class EngineStepError(RuntimeError):
    """A model step failed; the requests in it were aborted, the engine serves on."""


@dataclass(slots=True, kw_only=True)
class Sampling:
    """Sampling settings for one generate call (vLLM's, for the fields RL needs)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    fault: str | None = None  # test-only fault injection (PR2_ENABLE_FAULT_INJECTION=1)


@dataclass(slots=True, kw_only=True)
class Rollout:
    """One sample. ``routes[i]`` = expert ids used at position ``i`` of prompt + output
    (``[route_rows(len(prompt), len(output)), num_moe_layers, top_k]``, uint8 or uint16)."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    logprobs: list[float] | None
    routes: np.ndarray | None
    finish_reason: str
    weight_version: int


@dataclass(slots=True, kw_only=True)
class StreamEvent:
    """New tokens of one sample (streaming): their log-probs and the route rows that became
    known (rows ``routes_start ..``); ``finish_reason`` is set on the sample's last event."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int] | None  # on the sample's first event only
    token_ids: list[int]
    logprobs: list[float] | None
    routes: np.ndarray | None
    routes_start: int
    finish_reason: str | None
    weight_version: int


@dataclass(slots=True, kw_only=True)
class UpdateResult:
    weight_version: int
    num_tensors: int
    seconds: float  # total, queued behind running requests included
    reload_seconds: float  # the in-place reload in the workers


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineInfo:
    model: str
    architecture: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    moe_layer_indices: tuple[int, ...]
    route_dtype: str
    vocab_size: int
    max_model_len: int
