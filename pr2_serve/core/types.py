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
    "TopLogprobs",
    "UpdateResult",
]


TopLogprobs = dict[int, tuple[float, int | None]]
"""Log-probs at one position: ``{token id: (log-prob, rank)}`` in vLLM's order (the scored
token first, then the most likely ones; rank 1 = most likely)."""


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
    # for the OpenAI / SGLang dialects (defaults: off, as /v1/generate always had them)
    stop: Sequence[str] = ()  # stop strings (need text: detokenized)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    top_logprobs: int = 0  # alternatives per sampled token (Rollout.top_logprobs), <= 20
    prompt_logprobs: int | None = None  # score the prompt: this many alternatives per position
    detokenize: bool = False  # text of the output (Rollout.text); off: ids only (faster)
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
    text: str | None = None  # with Sampling.detokenize (or stop strings)
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    top_logprobs: list[TopLogprobs] | None = None  # with Sampling.top_logprobs > 0
    prompt_logprobs: list[TopLogprobs | None] | None = None  # Sampling.prompt_logprobs; [0] None


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
    text: str | None = None  # the new text (Sampling.detokenize)
    stop_reason: int | str | None = None
    top_logprobs: list[TopLogprobs] | None = None


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
    dtype: str = "unknown"  # what vLLM serves ("bfloat16" for an fp32 checkpoint under "auto")
