"""SGLang-compatible routes, thin over :class:`RolloutService`: ``POST /generate`` (what slime
and miles call for rollouts with routes), ``GET /get_model_info``, ``GET /health_generate``.

``/generate`` takes SGLang's ``GenerateReqInput`` fields ``input_ids`` | ``text`` (one prompt
or a batch), ``sampling_params`` (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
``min_p``, ``repetition_penalty``, ``stop``, ``stop_token_ids``, ``n``), ``return_logprob``,
``logprob_start_len``, ``top_logprobs_num``, ``return_routed_experts``,
``routed_experts_start_len``, ``stream``; it answers ``{"text", "output_ids", "meta_info":
{...}}`` for one prompt with ``n == 1``, else a list of them (prompt-major), or SSE
``data: {...}`` (text and ids so far) then ``data: [DONE]``. ``meta_info.routed_experts`` is
SGLang's encoding, base64 of flat int32 (:func:`~pr2_serve.core.route_protocol.int32_base64`);
``meta_info.weight_version`` is a string, as in SGLang. Refusals are shaped like the OpenAI
routes' (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRouter
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from pr2_serve.api.schemas import MAX_N, MAX_PROMPTS, TokenIds
from pr2_serve.core.route_protocol import int32_base64
from pr2_serve.core.types import Rollout, TopLogprobs
from pr2_serve.dialects.ecosystem import MAX_LOGPROBS, MAX_STOP, SSE_DONE, build_request, sse
from pr2_serve.dialects.openai_errors import (
    RESPONSES,
    STREAMING,
    OpenAIBody,
    error_body,
    route_class,
)
from pr2_serve.dialects.openai_schemas import REQUEST_CONFIG
from pr2_serve.service.errors import ApiError
from pr2_serve.service.rollout_service import RolloutService

__all__ = ["add_sglang_routes"]

PROTOCOL = "sglang"
NAMES = {
    "prompts": "input_ids",
    "max_tokens": "sampling_params[max_new_tokens]",
    "n": "sampling_params[n]",
    "temperature": "sampling_params[temperature]",
    "top_p": "sampling_params[top_p]",
    "top_k": "sampling_params[top_k]",
    "min_p": "sampling_params[min_p]",
    "stop": "sampling_params[stop]",
    "stop_token_ids": "sampling_params[stop_token_ids]",
    "top_logprobs": "top_logprobs_num",
    "routes_from": "routed_experts_start_len",
}


class SamplingParams(BaseModel):
    """SGLang's ``sampling_params`` (the fields pr2-serve honours; others are ignored)."""

    model_config = REQUEST_CONFIG

    max_new_tokens: StrictInt | None = Field(128, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(-1, ge=-1, description="-1 or 0: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=256)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63, alias="sampling_seed")


class GenerateInput(BaseModel):
    """``POST /generate``. Example: ``{"input_ids": [1, 2, 3], "sampling_params":
    {"max_new_tokens": 8, "temperature": 0}, "return_logprob": true,
    "return_routed_experts": true}``"""

    model_config = REQUEST_CONFIG

    text: (
        StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)] | None
    ) = None
    input_ids: (
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | None
    ) = None
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    return_logprob: StrictBool = False
    logprob_start_len: StrictInt = Field(-1, ge=-1, description="-1: no input log-probs")
    top_logprobs_num: StrictInt = Field(0, ge=0, le=MAX_LOGPROBS)
    return_text_in_logprobs: StrictBool = False
    return_routed_experts: StrictBool = False
    routed_experts_start_len: StrictInt = Field(0, ge=0)
    stream: StrictBool = False


def add_sglang_routes(app: FastAPI, service: RolloutService) -> None:
    """Register the SGLang-compatible routes on ``app``."""
    router = APIRouter(
        route_class=route_class(service, {"/generate": NAMES}), tags=["SGLang-compatible"]
    )

    @router.post("/generate", response_model=OpenAIBody | list[OpenAIBody], responses=STREAMING)
    async def generate(req: GenerateInput):
        """SGLang's ``/generate`` (see the module docstring). ``meta_info``: ``{"id",
        "finish_reason": {"type": "stop" | "length", "matched"?}, "prompt_tokens",
        "completion_tokens", "cached_tokens", "weight_version", "output_token_logprobs":
        [[logprob, id, text]], "input_token_logprobs", "routed_experts"}``."""
        batch, ids = prompts_of(req, service)
        dreq = request_of(req, ids)
        if req.stream:
            return await stream(req, dreq, service)
        rollouts = await service.generate(dreq, PROTOCOL)
        tok = service.engine.tokenizer
        outs = [output(r, req, tok) for r in rollouts]
        return JSONResponse(outs if batch or req.sampling_params.n > 1 else outs[0])

    @router.get("/get_model_info", response_model=OpenAIBody, responses=RESPONSES)
    async def get_model_info():
        """``{"model_path", "tokenizer_path", "is_generation": true, "weight_version", ...}``."""
        info = service.info()
        return JSONResponse(
            {
                "model_path": info["model"],
                "tokenizer_path": info["model"],
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": str(info["weight_version"]),
                "num_moe_layers": info["num_moe_layers"],
                "num_experts": info["num_experts"],
                "top_k": info["top_k"],
            }
        )

    @router.get("/health_generate", response_class=Response, responses={503: {}})
    async def health_generate():
        """200 once a one-token generate has been answered, else 503 (SGLang's check)."""
        probe = build_request(NAMES, prompts=[[0]], max_tokens=1, temperature=0.0)
        try:
            await service.generate(probe.model_copy(update={"return_routes": False}), PROTOCOL)
        except ApiError:
            return Response(status_code=503)
        return Response(status_code=200)

    app.include_router(router)


def prompts_of(req: GenerateInput, service: RolloutService) -> tuple[bool, list[list[int]]]:
    """Whether the input is a batch, and its prompts as token ids (text: no special tokens)."""
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "invalid_argument", "give exactly one of text or input_ids", "text")
    if service.engine is None:
        raise ApiError(503, "unavailable", "the model is still loading")
    if req.text is not None:
        texts = req.text if isinstance(req.text, list) else [req.text]
        return isinstance(req.text, list), [service.engine.tokenize(t) for t in texts]
    batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
    return batch, [list(p) for p in req.input_ids] if batch else [list(req.input_ids)]


def request_of(req: GenerateInput, ids: list[list[int]]):
    sp = req.sampling_params
    scored = req.return_logprob and req.logprob_start_len >= 0
    if scored and req.stream:
        raise ApiError(
            400, "invalid_argument", "input log-probs need stream false", "logprob_start_len"
        )
    return build_request(
        NAMES,
        prompts=ids,
        n=sp.n,
        max_tokens=sp.max_new_tokens or 128,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k or -1,
        min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty,
        seed=sp.seed,
        stop=[sp.stop] if isinstance(sp.stop, str) else list(sp.stop or []),
        stop_token_ids=list(sp.stop_token_ids or []),
        return_logprobs=req.return_logprob,
        top_logprobs=req.top_logprobs_num if req.return_logprob else 0,
        prompt_logprobs=req.top_logprobs_num if scored else None,
        return_routes=req.return_routed_experts,
        routes_from=req.routed_experts_start_len,
        detokenize=True,
    )


def triples(tok, ids: list[int], lps: list[float | None], with_text: bool) -> list[list]:
    """SGLang's ``[[logprob, token id, text or None], ...]``."""
    return [[lp, t, tok.decode([t]) if with_text else None] for t, lp in zip(ids, lps, strict=True)]


def top_triples(tok, pos: list[TopLogprobs | None], num: int, with_text: bool) -> list:
    """SGLang's ``*_top_logprobs``: per position the ``num`` most likely as triples."""
    out: list[Any] = []
    for p in pos:
        if p is None:
            out.append(None)
            continue
        best = sorted(p.items(), key=lambda kv: -kv[1][0])[:num]
        out.append(triples(tok, [t for t, _ in best], [v[0] for _, v in best], with_text))
    return out


def output(r: Rollout, req: GenerateInput, tok) -> dict:
    """One sample in SGLang's shape."""
    reason: dict[str, Any] | None = {"type": r.finish_reason} if r.finish_reason else None
    if r.finish_reason == "stop" and r.stop_reason is not None:
        reason["matched"] = r.stop_reason
    elif r.finish_reason == "length":
        reason["length"] = len(r.output_token_ids)
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": reason,
        "prompt_tokens": len(r.prompt_token_ids),
        "completion_tokens": len(r.output_token_ids),
        "cached_tokens": 0,
        "weight_version": str(r.weight_version),
    }
    text_in = req.return_text_in_logprobs
    if req.return_logprob:
        meta["output_token_logprobs"] = triples(tok, r.output_token_ids, r.logprobs, text_in)
        if req.top_logprobs_num:
            meta["output_top_logprobs"] = top_triples(
                tok, r.top_logprobs, req.top_logprobs_num, text_in
            )
        if r.prompt_logprobs is not None:
            start = req.logprob_start_len
            pos = r.prompt_logprobs[start:]
            ids = r.prompt_token_ids[start:]
            lps = [None if p is None else p[t][0] for t, p in zip(ids, pos, strict=True)]
            meta["input_token_logprobs"] = triples(tok, ids, lps, text_in)
            meta["input_top_logprobs"] = top_triples(
                tok, pos, max(1, req.top_logprobs_num), text_in
            )
    if r.routes is not None:
        meta["routed_experts"] = int32_base64(r.routes, req.routed_experts_start_len)
    return {"text": r.text or "", "output_ids": r.output_token_ids, "meta_info": meta}


async def stream(req: GenerateInput, dreq, service: RolloutService) -> StreamingResponse:
    """SSE: per event the sample's text and ids so far (SGLang's default, non-incremental),
    ``meta_info`` on each; then ``data: [DONE]``."""
    events = service.stream(dreq, PROTOCOL)
    first = await anext(events, None)
    tok = service.engine.tokenizer

    async def body():
        acc: dict[tuple[int, int], Rollout] = {}
        ev = first
        try:
            while ev is not None:
                key = (ev.prompt_index, ev.sample_index)
                if key not in acc:
                    acc[key] = Rollout(
                        prompt_index=ev.prompt_index,
                        sample_index=ev.sample_index,
                        prompt_token_ids=ev.prompt_token_ids or [],
                        output_token_ids=[],
                        logprobs=[] if ev.logprobs is not None else None,
                        routes=None,
                        finish_reason="",
                        weight_version=ev.weight_version,
                        text="",
                        top_logprobs=[] if ev.top_logprobs is not None else None,
                    )
                r = acc[key]
                r.output_token_ids += ev.token_ids
                r.text = (r.text or "") + (ev.text or "")
                if ev.logprobs is not None:
                    r.logprobs += ev.logprobs
                if ev.top_logprobs is not None:
                    r.top_logprobs += ev.top_logprobs
                r.finish_reason, r.stop_reason = ev.finish_reason or "", ev.stop_reason
                out = output(r, req.model_copy(update={"return_routed_experts": False}), tok)
                out["index"] = ev.prompt_index * dreq.n + ev.sample_index
                yield sse(out)
                ev = await anext(events, None)
        except ApiError as e:
            yield sse(error_body(e, NAMES))
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream")
