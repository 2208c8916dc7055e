"""Request/response shapes of the rollout API, shared by HTTP (JSON) and gRPC.

A gRPC request is turned into the same :class:`GenerateRequest` before anything else, so both
protocols validate identically and name the same field in their errors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_PROMPTS = 1024
MAX_N = 64
MIN_WEIGHT_VERSION = 1  # pushed versions; 0 is the checkpoint as loaded
MAX_WEIGHT_VERSION = (1 << 63) - 1  # int64 on the gRPC wire

TokenIds = Annotated[list[StrictInt], Field(max_length=1 << 20)]


class GenerateRequest(BaseModel):
    """``POST /v1/generate`` body (also ``/v1/generate/stream``).

    Example:
        ``{"prompts": [[1, 2, 3], "12+35="], "n": 2, "temperature": 1.0, "max_tokens": 16,
        "seed": 0}``
    """

    model_config = ConfigDict(extra="forbid")

    prompts: list[TokenIds | StrictStr] = Field(
        min_length=1, max_length=MAX_PROMPTS, description="token-id lists or text"
    )
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="vLLM's range")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(-1, ge=-1, description="-1: off")
    max_tokens: StrictInt = Field(16, ge=1, le=1 << 20)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63)
    stop_token_ids: list[StrictInt] = Field(default_factory=list, max_length=256)
    return_logprobs: StrictBool = True
    return_routes: StrictBool = True
    routes_from: StrictInt = Field(0, ge=0, description="return only route rows >= this position")
    min_weight_version: StrictInt = Field(0, ge=0, description="refuse (409) if serving older")


class RoutesJson(BaseModel):
    dtype: Literal["uint8", "uint16"]
    shape: list[int] = Field(description="[rows, num_moe_layers, top_k]")
    data: str = Field(description="base64 of the little-endian array")
    start: int = Field(0, description="position of the first row")


class Sample(BaseModel):
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: int
    routes: RoutesJson | None


class GenerateResponse(BaseModel):
    """``POST /v1/generate`` response.

    Example:
        ``{"weight_version": 3, "samples": [{"prompt_index": 0, "sample_index": 0,
        "prompt_token_ids": [1, 2, 3], "output_token_ids": [7, 9], "logprobs": [-1.2, -0.3],
        "finish_reason": "length", "weight_version": 3, "routes": {"dtype": "uint8",
        "shape": [4, 4, 2], "data": "AQIDBA...", "start": 0}}]}``
    """

    weight_version: int
    samples: list[Sample]


class Info(BaseModel):
    """``GET /v1/info``.

    Example:
        ``{"model": "/models/tiny", "architecture": "Qwen3MoeForCausalLM", "num_moe_layers": 4,
        "num_experts": 8, "top_k": 2, "weight_version": 0, "predictor": true,
        "route_dtype": "uint8", "max_model_len": 2048, "vocab_size": 512,
        "kept_versions": [3, 2, 0], "dtype": "float32",
        "policy_fingerprint": "9f2c...", "predictor_fingerprint": "03ab...",
        "weight_source": "pushed version 3", "predictor_active": true,
        "predictor_norm": 0.41}`` (``kept_versions``: what ``POST
        /v1/weights/rollback/{version}`` can go back to; 0 is the model directory)
    """

    model: str
    architecture: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    weight_version: int
    predictor: bool
    route_dtype: Literal["uint8", "uint16"]
    max_model_len: int
    vocab_size: int
    kept_versions: list[int]
    dtype: str = Field(
        description="the dtype vLLM serves the weights in (--dtype auto serves an fp32 "
        "checkpoint in bfloat16)"
    )
    policy_fingerprint: str = Field(
        description="content hash of the served policy weights (pr2_serve.core.fingerprint: names, "
        "shapes, float32 values), computed when a version is committed"
    )
    predictor_fingerprint: str = Field(
        description="the same over the predictor weights (absent predictors count as zeros)"
    )
    weight_source: str = Field(
        description='where the served weights came from: "model directory", "pushed version '
        'N", "version N restored from the state directory ...", or a rollback'
    )
    predictor_active: bool = Field(description="a non-zero predictor shifts the routing")
    predictor_norm: float = Field(description="L2 norm of all predictor weights")


class WeightsResponse(BaseModel):
    """``PUT /v1/weights/{version}`` and ``POST /v1/weights/rollback/{version}`` response.
    Example: ``{"weight_version": 4, "num_tensors": 139, "seconds": 0.31,
    "receive_seconds": 0.12, "check_seconds": 0.01, "apply_seconds": 0.17,
    "canary_seconds": 0.02}`` (upload streamed to disk + sha256; names, shapes, dtypes and
    finite values checked; in-place reload in the workers; the canary generate). A rollback
    also has ``"rolled_back_to": 2``."""

    weight_version: int
    num_tensors: int
    seconds: float
    receive_seconds: float
    check_seconds: float = 0.0
    apply_seconds: float
    canary_seconds: float = 0.0
    rolled_back_to: int | None = None


class LoadWeightsRequest(BaseModel):
    """``POST /v1/weights/load/{version}``: a checkpoint on the server's filesystem (a
    ``.safetensors`` file or a directory of them), inside ``pr2-serve --weights-dir``
    (relative paths are taken from it). Example: ``{"path": "step-40/model"}``."""

    model_config = ConfigDict(extra="forbid")
    path: StrictStr = Field(min_length=1, max_length=4096)


class Readiness(BaseModel):
    """``GET /readyz``: ``{"status": "ready", "weight_version": 3}``, or (503)
    ``{"status": "not ready", "reason": "loading"}``."""

    status: Literal["ready", "not ready"]
    weight_version: int | None = None
    reason: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx. Example: ``{"error": {"type": "invalid_argument",
    "message": "token id 900 outside the vocabulary [0, 512)", "field": "prompts[0][3]"}}``"""

    error: dict[str, str]
