"""Rollouts and stream events as vLLM 0.32's OpenAI-compatible bodies (completion and chat
choices, their log-probs, stream chunks, usage), built as plain dicts.

The log-prob blocks follow vLLM's serving code: completions give ``tokens``,
``token_logprobs``, ``text_offset`` and ``top_logprobs`` (the scored token and the ``logprobs``
most likely, keyed by token text); chat gives ``content`` entries with ``top_logprobs`` lists.
Log-probs below -9999 (``-inf``) are sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

import time
import uuid

from pr2_serve.core.route_protocol import npy_base64
from pr2_serve.core.types import Rollout, StreamEvent, TopLogprobs
from pr2_serve.dialects.ecosystem import decode_tokens

__all__ = [
    "Render",
    "chat_logprobs",
    "completion_logprobs",
    "positions",
    "usage",
]

FLOOR = -9999.0


def positions(ids: list[int], logprobs, top: list[TopLogprobs] | None) -> list[TopLogprobs]:
    """Per token, ``{id: (logprob, rank)}`` with the token itself first: the top log-probs when
    asked for, else the sampled token's alone."""
    if top is not None:
        return top
    return [{t: (lp, None)} for t, lp in zip(ids, logprobs, strict=True)]


def completion_logprobs(
    tokenizer, ids: list[int], pos: list[TopLogprobs | None], num_top: int, as_ids: bool
) -> dict:
    """vLLM's ``CompletionLogProbs`` of ``ids`` (``pos[i] is None``: no log-prob there, as for
    the first prompt token)."""
    tokens = decode_tokens(tokenizer, ids, as_ids)
    offsets, at = [], 0
    token_lps: list[float | None] = []
    tops: list[dict | None] = []
    for tok, t, p in zip(tokens, ids, pos, strict=True):
        offsets.append(at)
        at += len(tok)
        if p is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(max(p[t][0], FLOOR))
        alts = list(p.items())[: num_top + 1]
        names = decode_tokens(tokenizer, [a for a, _ in alts], as_ids)
        tops.append({name: max(lp, FLOOR) for name, (_, (lp, _r)) in zip(names, alts, strict=True)})
    return {
        "text_offset": offsets,
        "token_logprobs": token_lps,
        "tokens": tokens,
        "top_logprobs": tops,
    }


def chat_logprobs(
    tokenizer, ids: list[int], pos: list[TopLogprobs], num_top: int, as_ids: bool
) -> dict:
    """vLLM's ``ChatCompletionLogProbs``: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs"}]}``."""
    content = []
    for t, p in zip(ids, pos, strict=True):
        alts = list(p.items())[:num_top]
        names = decode_tokens(tokenizer, [t] + [a for a, _ in alts], as_ids)
        texts = decode_tokens(tokenizer, [t] + [a for a, _ in alts], False)
        content.append(
            {
                "token": names[0],
                "logprob": max(p[t][0], FLOOR),
                "bytes": list(texts[0].encode("utf-8", errors="replace")),
                "top_logprobs": [
                    {
                        "token": n,
                        "logprob": max(lp, FLOOR),
                        "bytes": list(x.encode("utf-8", "replace")),
                    }
                    for n, x, (_, (lp, _r)) in zip(names[1:], texts[1:], alts, strict=True)
                ],
            }
        )
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Render:
    """The response pieces of one request: ``kind`` is ``"completion"`` or ``"chat"``;
    ``opts`` the request's output options (see :meth:`choice`)."""

    def __init__(
        self,
        kind: str,
        model: str,
        tokenizer,
        *,
        num_top: int | None,
        as_ids: bool,
        token_ids: bool,
        routes_from: int | None,
    ):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.num_top, self.as_ids, self.token_ids = num_top, as_ids, token_ids
        self.routes_from = routes_from  # None: no routed_experts
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, choices: list[dict], stream: bool = False) -> dict:
        obj = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if stream and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def text(self, r: Rollout) -> str:
        if r.text is not None:
            return r.text
        return self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)

    def logprobs(self, ids: list[int], pos: list) -> dict | None:
        if self.num_top is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, ids, pos, self.num_top, self.as_ids)
        return completion_logprobs(self.tokenizer, ids, pos, self.num_top, self.as_ids)

    def choice(self, index: int, r: Rollout, echo: tuple[str, list] | None = None) -> dict:
        """One finished sample; ``echo``: the prompt's text and log-prob positions to prepend
        (completions), its tokens' log-probs first."""
        ids, text = list(r.output_token_ids), self.text(r)
        pos = positions(ids, r.logprobs, r.top_logprobs) if self.num_top is not None else []
        if echo is not None:
            prompt_text, prompt_pos = echo
            ids, text, pos = r.prompt_token_ids + ids, prompt_text + text, prompt_pos + pos
        body: dict = {"index": index}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        body["logprobs"] = self.logprobs(ids, pos)
        body["finish_reason"] = r.finish_reason
        body["stop_reason"] = r.stop_reason
        if self.token_ids:
            body["token_ids"] = list(r.output_token_ids)
            if self.kind == "completion":
                body["prompt_token_ids"] = r.prompt_token_ids
        if self.routes_from is not None and r.routes is not None:
            body["routed_experts"] = npy_base64(r.routes, self.routes_from)
        body["weight_version"] = r.weight_version
        return body

    def chunk(self, index: int, ev: StreamEvent) -> dict:
        """One stream event as a chunk's choice."""
        body: dict = {"index": index}
        text = ev.text or ""
        if self.kind == "chat":
            body["delta"] = {"content": text}
        else:
            body["text"] = text
        if self.num_top is not None and ev.logprobs is not None:
            pos = positions(ev.token_ids, ev.logprobs, ev.top_logprobs)
            body["logprobs"] = self.logprobs(ev.token_ids, pos)
        body["finish_reason"] = ev.finish_reason
        if ev.finish_reason is not None:
            body["stop_reason"] = ev.stop_reason
        if self.token_ids:
            body["token_ids"] = ev.token_ids
            if self.kind == "completion" and ev.prompt_token_ids is not None:
                body["prompt_token_ids"] = ev.prompt_token_ids
        return body
