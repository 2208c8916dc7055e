"""OpenAI-compatible routes in vLLM 0.32's shapes, thin over :class:`RolloutService`:
``GET /v1/models``, ``GET /health``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /tokenize``, ``POST /detokenize``.

Each request becomes a :class:`~.dialect.DialectRequest` served by ``service.generate`` /
``service.stream`` (same admission, limits, metrics -- protocol ``openai`` -- and versions as
``/v1/generate``). Refusals are OpenAI-shaped, ``{"error": {"message", "type", "param",
"code"}}``, so the ``openai`` client raises ``BadRequestError`` with ``.param`` naming the field.
``routed_experts`` is vLLM's encoding (:func:`~pr2_serve.core.route_protocol.npy_base64`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRouter
from pydantic import BaseModel

from pr2_serve.dialects.ecosystem import SSE_DONE, build_request, sse
from pr2_serve.dialects.openai_errors import (
    RESPONSES,
    STREAMING,
    OpenAIBody,
    error_body,
    route_class,
)
from pr2_serve.dialects.openai_render import Render, usage
from pr2_serve.dialects.openai_schemas import (
    UNSUPPORTED,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from pr2_serve.service.errors import ApiError
from pr2_serve.service.rollout_service import RolloutService

__all__ = ["add_openai_routes"]

PROTOCOL = "openai"
# our field names -> the OpenAI parameters they come from
COMPLETION_NAMES = {
    "prompts": "prompt",
    "top_logprobs": "logprobs",
    "routes_from": "routed_experts_prompt_start",
    "return_routes": "return_routed_experts",
}
CHAT_NAMES = {**COMPLETION_NAMES, "prompts": "messages", "top_logprobs": "top_logprobs"}


def add_openai_routes(app: FastAPI, service: RolloutService) -> None:
    """Register the OpenAI-compatible routes on ``app``."""
    names = {"/v1/completions": COMPLETION_NAMES, "/v1/chat/completions": CHAT_NAMES}
    router = APIRouter(route_class=route_class(service, names), tags=["OpenAI-compatible"])
    add_model_routes(router, service)
    add_completion_route(router, service)
    add_chat_route(router, service)
    add_tokenizer_routes(router, service)
    app.include_router(router)


# -- helpers ---------------------------------------------------------------------------------------
def engine_of(service: RolloutService):
    if service.engine is None:
        raise ApiError(503, "unavailable", "the model is still loading")
    return service.engine


def check_model(req, service: RolloutService) -> str:
    """The served model's id; 404 naming ``model`` when the request names another."""
    served = service.info()["model"]
    if getattr(req, "model", None) not in (None, served):
        raise ApiError(404, "not_found", f"The model `{req.model}` does not exist.", "model")
    return served


def check_supported(req: BaseModel) -> None:
    """400 naming a vLLM field pr2-serve does not implement, when set to anything but off."""
    for name in UNSUPPORTED:
        value = (req.model_extra or {}).get(name)
        if value not in (None, False, 0, 0.0, "", [], {}):
            raise ApiError(400, "invalid_argument", f"{name} is not supported by pr2-serve", name)


def sampling_fields(req: SamplingFields, service: RolloutService) -> dict:
    """The :class:`DialectRequest` fields every OpenAI request sets the same way."""
    want_routes = req.return_routed_experts
    if want_routes is None:
        want_routes = getattr(service.limits, "enable_return_routed_experts", False)
    return {
        "n": req.n,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": -1 if not req.top_k else req.top_k,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": req.repetition_penalty or 1.0,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        # vLLM 0.32 streams no routed_experts (its stream choices have no such field): none
        # are fetched for a stream
        "return_routes": want_routes and not req.stream,
        "routes_from": req.routed_experts_prompt_start,
        "min_weight_version": req.min_weight_version,
        "detokenize": bool(req.stream),  # else the text is decoded here, off the engine thread
    }


def render_for(kind: str, req, model: str, tokenizer, num_top: int | None) -> Render:
    return Render(
        kind,
        model,
        tokenizer,
        num_top=num_top,
        as_ids=bool(req.return_tokens_as_token_ids),
        token_ids=bool(req.return_token_ids),
        routes_from=req.routed_experts_prompt_start
        if req.return_routed_experts is not False
        else None,
    )


async def event_stream(
    render: Render, events: AsyncIterator, n: int, req, prompt_tokens: int
) -> StreamingResponse:
    """SSE of a stream job: one chunk per event, the usage chunk if asked, then ``[DONE]``.
    The first event is awaited here, so a refused request is a 4xx, not a broken stream."""
    first = await anext(events, None)
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)

    async def body():
        out_tokens, ev = 0, first
        try:
            while ev is not None:
                out_tokens += len(ev.token_ids)
                choice = render.chunk(ev.prompt_index * n + ev.sample_index, ev)
                if render.kind == "chat" and ev.prompt_token_ids is not None:
                    choice["delta"]["role"] = "assistant"
                chunk = {
                    **render.envelope([choice], stream=True),
                    "weight_version": ev.weight_version,
                }
                if render.kind == "chat" and render.token_ids and ev.prompt_token_ids is not None:
                    chunk["prompt_token_ids"] = ev.prompt_token_ids
                yield sse(chunk)
                ev = await anext(events, None)
            if include_usage:
                yield sse(
                    {**render.envelope([], stream=True), "usage": usage(prompt_tokens, out_tokens)}
                )
        except ApiError as e:  # after the 200: the error is the stream's last event
            yield sse(error_body(e))
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream")


# -- routes ----------------------------------------------------------------------------------------
def add_model_routes(router: APIRouter, service: RolloutService) -> None:
    @router.get("/v1/models", response_model=OpenAIBody, responses=RESPONSES)
    async def models():
        """The served model: ``{"object": "list", "data": [{"id": "<model dir>", "object":
        "model", "owned_by": "pr2", "max_model_len": 2048, ...}]}``."""
        info = service.info()
        card = {
            "id": info["model"],
            "object": "model",
            "created": 0,
            "owned_by": "pr2",
            "root": info["model"],
            "parent": None,
            "max_model_len": info["max_model_len"],
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/health", response_class=Response, responses={503: {}})
    async def health():
        """vLLM's health check: 200 (empty) when serving, else 503."""
        return Response(status_code=200 if service.is_ready() else 503)


def add_completion_route(router: APIRouter, service: RolloutService) -> None:
    @router.post("/v1/completions", response_model=OpenAIBody, responses=STREAMING)
    async def completions(req: CompletionRequest):
        """vLLM's ``CompletionResponse`` (or SSE chunks with ``stream``): ``choices[i]`` =
        ``{"index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
        "prompt_token_ids", "routed_experts", "weight_version"}``, ``usage``; choices are
        prompt-major (``n`` per prompt)."""
        check_supported(req)
        model = check_model(req, service)
        engine = engine_of(service)
        tok = engine.tokenizer
        raw, ids = completion_prompts(req, tok)
        echo = bool(req.echo)
        if req.max_tokens == 0 and not echo:
            raise ApiError(400, "invalid_argument", "max_tokens 0 needs echo", "max_tokens")
        if req.stream and (echo or req.prompt_logprobs is not None):
            field = "echo" if echo else "prompt_logprobs"
            raise ApiError(400, "invalid_argument", f"{field} is not supported with stream", field)
        prompt_lps = req.prompt_logprobs
        if echo and req.logprobs is not None and prompt_lps is None:
            prompt_lps = req.logprobs
        dreq = build_request(
            COMPLETION_NAMES,
            prompts=ids,
            max_tokens=req.max_tokens or 1,  # echo with 0: score the prompt, one token drawn
            return_logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            prompt_logprobs=prompt_lps,
            **sampling_fields(req, service),
        )
        render = render_for("completion", dreq_opts(req, dreq), model, tok, req.logprobs)
        if req.stream:
            events = service.stream(dreq, PROTOCOL)
            return await event_stream(render, events, req.n, req, sum(map(len, ids)))
        rollouts = await service.generate(dreq, PROTOCOL)
        choices = [render.choice(i, *echoed(req, r, raw, tok)) for i, r in enumerate(rollouts)]
        return completion_body(render, choices, rollouts, ids, req.prompt_logprobs is not None)


def completion_prompts(req: CompletionRequest, tok) -> tuple[list, list[list[int]]]:
    """The prompts as given (a list) and as token ids (text: special tokens added unless
    ``add_special_tokens`` is false, as vLLM does)."""
    p = req.prompt
    raw = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
    ids = [
        tok(x, add_special_tokens=req.add_special_tokens)["input_ids"]
        if isinstance(x, str)
        else list(x)
        for x in raw
    ]
    return raw, ids


def echoed(req: CompletionRequest, r, raw: list, tok) -> tuple:
    """``(rollout, echo)`` for :meth:`Render.choice`: with ``echo``, the prompt's text (empty
    with ``return_token_ids``, as vLLM) and log-prob positions; ``max_tokens`` 0 drops the
    one token drawn."""
    if not req.echo:
        return r, None
    given = raw[r.prompt_index]
    text = "" if req.return_token_ids else given if isinstance(given, str) else tok.decode(given)
    pos = list(r.prompt_logprobs or [None] * len(r.prompt_token_ids))
    if req.max_tokens == 0:
        top = [] if r.top_logprobs is not None else None
        r.output_token_ids, r.logprobs, r.top_logprobs, r.text = [], [], top, ""
    return r, (text, pos)


def dreq_opts(req, dreq):
    """The request with ``return_routed_experts`` resolved (server flag or request)."""
    return req.model_copy(update={"return_routed_experts": dreq.return_routes})


def completion_body(
    render: Render, choices, rollouts, ids, with_prompt_logprobs: bool
) -> JSONResponse:
    out = sum(len(r.output_token_ids) for r in rollouts)
    body = {**render.envelope(choices), "usage": usage(sum(map(len, ids)), out)}
    if with_prompt_logprobs:
        for c, r in zip(choices, rollouts, strict=True):
            c["prompt_logprobs"] = prompt_logprobs_json(render.tokenizer, r.prompt_logprobs)
    body["weight_version"] = rollouts[0].weight_version if rollouts else None
    return JSONResponse(body)


def prompt_logprobs_json(tokenizer, pos) -> list | None:
    """vLLM's ``prompt_logprobs``: per position ``{"<id>": {"logprob", "rank",
    "decoded_token"}}`` (``None`` for the first)."""
    if pos is None:
        return None
    return [
        None
        if p is None
        else {
            str(t): {
                "logprob": max(lp, -9999.0),
                "rank": rank,
                "decoded_token": tokenizer.decode([t]),
            }
            for t, (lp, rank) in p.items()
        }
        for p in pos
    ]


def add_chat_route(router: APIRouter, service: RolloutService) -> None:
    @router.post("/v1/chat/completions", response_model=OpenAIBody, responses=STREAMING)
    async def chat(req: ChatRequest):
        """vLLM's ``ChatCompletionResponse`` (or SSE chunks with ``stream``): ``choices[i]`` =
        ``{"index", "message": {"role": "assistant", "content"}, "logprobs": {"content":
        [...]}, "finish_reason", "token_ids", "routed_experts", "weight_version"}``,
        ``prompt_token_ids``, ``usage``. The prompt is the tokenizer's chat template."""
        check_supported(req)
        model = check_model(req, service)
        engine = engine_of(service)
        ids = chat_prompt(engine, req.messages, req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, engine.info.max_model_len - len(ids))
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        dreq = build_request(
            CHAT_NAMES,
            prompts=[ids],
            max_tokens=max_tokens,
            return_logprobs=bool(req.logprobs),
            top_logprobs=num_top or 0,
            **sampling_fields(req, service),
        )
        render = render_for("chat", dreq_opts(req, dreq), model, engine.tokenizer, num_top)
        if req.stream:
            return await event_stream(render, service.stream(dreq, PROTOCOL), req.n, req, len(ids))
        rollouts = await service.generate(dreq, PROTOCOL)
        choices = [render.choice(i, r) for i, r in enumerate(rollouts)]
        out = sum(len(r.output_token_ids) for r in rollouts)
        body = {**render.envelope(choices), "usage": usage(len(ids), out)}
        if req.return_token_ids:
            body["prompt_token_ids"] = ids
        body["weight_version"] = rollouts[0].weight_version
        return JSONResponse(body)


TEMPLATE_ARGS = (
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "tools",
    "conversation",
)


def chat_prompt(engine, messages, req) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template; 400 on ``messages``
    when the template refuses them."""
    convo = []
    for m in messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            msg["content"] = "\n".join(p.text for p in m.content)
        convo.append(msg)
    kwargs = {
        k: v
        for k, v in (getattr(req, "chat_template_kwargs", None) or {}).items()
        if k not in TEMPLATE_ARGS
    }
    try:
        text = engine.tokenizer.apply_chat_template(
            convo,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            tools=getattr(req, "tools", None),
            **kwargs,
        )
    except Exception as e:  # a template error is the request's messages at fault
        raise ApiError(400, "invalid_argument", f"chat template: {e}", "messages") from e
    return engine.tokenize(text)


def add_tokenizer_routes(router: APIRouter, service: RolloutService) -> None:
    @router.post("/tokenize", response_model=OpenAIBody, responses=RESPONSES)
    async def tokenize(req: TokenizeRequest):
        """``{"count", "max_model_len", "tokens", "token_strs"}`` of ``prompt`` (special
        tokens added unless ``add_special_tokens`` is false) or of ``messages`` (chat
        template)."""
        check_model(req, service)
        engine = engine_of(service)
        tok = engine.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "invalid_argument", "give prompt or messages", "prompt")
        if req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens is not False)[
                "input_ids"
            ]
        else:
            ids = chat_prompt(engine, req.messages, req)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": engine.info.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    @router.post("/detokenize", response_model=OpenAIBody, responses=RESPONSES)
    async def detokenize(req: DetokenizeRequest):
        """``{"prompt": "<text of tokens>"}``."""
        check_model(req, service)
        engine = engine_of(service)
        for i, t in enumerate(req.tokens):
            if not 0 <= t < engine.info.vocab_size:
                raise ApiError(
                    400, "invalid_argument", f"token id {t} outside the vocabulary", f"tokens[{i}]"
                )
        return JSONResponse({"prompt": engine.tokenizer.decode(req.tokens)})
