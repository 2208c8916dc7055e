"""Request and response shapes of the OpenAI-compatible routes, as vLLM 0.32 defines them
(``vllm/entrypoints/openai/{completion,chat_completion}/protocol.py``,
``serve/tokenize/protocol.py``), for the fields ``pr2-serve`` honours.

Like vLLM, unknown fields are accepted and ignored (``extra="allow"``); fields vLLM knows that
``pr2-serve`` does not implement are refused when set (:data:`UNSUPPORTED`), naming them.
Extensions: ``return_routed_experts`` (ask for ``routed_experts`` per request; the server flag
``--enable-return-routed-experts`` sets it for all) and ``min_weight_version`` (409 when the
server serves older weights) on requests, ``weight_version`` on responses and choices.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

from pr2_serve.api.schemas import MAX_N, MAX_PROMPTS, TokenIds
from pr2_serve.dialects.ecosystem import MAX_LOGPROBS, MAX_STOP

__all__ = [
    "REQUEST_CONFIG",
    "UNSUPPORTED",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "TokenizeRequest",
]

# Unknown fields are accepted and ignored, as vLLM does; the spec lists only the known ones
# (closed objects: the schema fuzzing then draws bodies of known fields, not arbitrary JSON).
REQUEST_CONFIG = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
Scalar = StrictStr | StrictBool | StrictInt | float | None
# tool objects hold JSON schemas: documented as closed objects (see REQUEST_CONFIG)
Tools = Annotated[
    list[dict[str, Any]],
    Field(max_length=256),
    WithJsonSchema(
        {
            "type": "array",
            "maxItems": 256,
            "items": {"type": "object", "additionalProperties": False},
        }
    ),
]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None
# fields of vLLM's requests that pr2-serve does not implement: refused unless left at "off"
UNSUPPORTED = (
    "suffix",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "use_beam_search",
    "response_format",
    "structured_outputs",
    "logprob_token_ids",
    "prompt_embeds",
    "allowed_token_ids",
    "bad_words",
    "min_tokens",
    "chat_template",
)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class SamplingFields(BaseModel):
    """What completions and chat requests share (vLLM's names and ranges)."""

    model_config = REQUEST_CONFIG

    model: StrictStr | None = Field(None, description="the served model's id (GET /v1/models)")
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1.0")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63)
    stop: Stop = Field(None, description="stop strings (not in the output)")
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=256)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    return_token_ids: StrictBool | None = Field(
        None, description="prompt_token_ids and token_ids on the choices"
    )
    return_tokens_as_token_ids: StrictBool | None = Field(
        None, description='log-prob tokens as "token_id:<id>"'
    )
    routed_experts_prompt_start: StrictInt = Field(
        0, ge=0, description="routed_experts from this position on"
    )
    return_routed_experts: StrictBool | None = Field(
        None, description="extension: fill routed_experts (base64 .npy)"
    )
    min_weight_version: StrictInt = Field(
        0, ge=0, description="extension: refuse (409) if the server serves older weights"
    )


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. Example: ``{"model": "<id>", "prompt": "12+35=",
    "max_tokens": 8, "temperature": 0, "logprobs": 0, "return_routed_experts": true}``"""

    prompt: (
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | StrictStr
    ) = Field(description="text, token ids, or a list of either")
    max_tokens: StrictInt | None = Field(16, ge=0, le=1 << 20, description="0 with echo: score")
    echo: StrictBool | None = Field(False, description="prepend the prompt (and its log-probs)")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: StrictBool = True


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: the prompt is the tokenizer's chat template applied to
    ``messages``. Example: ``{"model": "<id>", "messages": [{"role": "user", "content":
    "hi"}], "max_tokens": 8, "logprobs": true}``"""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20, description="default: the rest")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(0, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Scalar] | None = Field(None, max_length=64)
    tools: Tools | None = Field(None, description="rendered by the chat template (OpenAI tools)")
    tool_choice: Literal["none"] | None = Field(None, description='only "none" (no tool parsing)')


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: ``{"prompt": "text"}`` or ``{"messages": [...]}`` (chat template)."""

    model_config = REQUEST_CONFIG

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool | None = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: ``{"tokens": [1, 2, 3]}`` -> ``{"prompt": "text"}``."""

    model_config = REQUEST_CONFIG

    model: StrictStr | None = None
    tokens: TokenIds
