"""Bookkeeping of the engine's jobs: a job's prompts become vLLM requests, vLLM's outputs become
:class:`Rollout` objects (or streamed :class:`StreamEvent` s) with their routes.

Runs on the engine thread only (no locks). Request ids and route-store keys follow the protocol
of :mod:`pr2_serve.core.route_protocol` (``request_id`` / ``store_key`` / ``route_rows``).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pr2_serve.core.route_protocol import prompt_index, request_id, route_rows, store_key
from pr2_serve.core.types import (
    EngineInfo,
    EngineStepError,
    RequestRejected,
    Rollout,
    Sampling,
    StreamEvent,
    TopLogprobs,
)

ROUTE_KEY = "pr2_route_key"  # SamplingParams.extra_args key the worker reads (plugin/worker.py)


def resolve(fut: cf.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set ``fut``'s outcome, unless its caller cancelled it (gone: nobody reads it, and the
    engine must not fail on it)."""
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except cf.InvalidStateError:
        pass


@dataclass
class Job:
    """One generate call: ``sampling.n`` samples of each prompt, resolved as one future."""

    prompts: list[list[int]]
    sampling: Sampling
    return_logprobs: bool
    return_routes: bool
    future: cf.Future
    on_event: Callable[[StreamEvent], None] | None = None  # streaming jobs
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    version: int = -1
    pending: set[str] = field(default_factory=set)
    outputs: dict[int, Any] = field(default_factory=dict)
    streamed: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # tokens, rows sent


@dataclass
class Update:
    """A staged weight update waiting for the running requests to finish."""

    files: dict[str, str]
    version: int
    num_tensors: int
    future: cf.Future
    submitted: float = field(default_factory=time.perf_counter)


def check_prompt(
    prompt: Sequence[int] | str,
    sampling: Sampling,
    info: EngineInfo,
    tokenize: Callable[[str], list[int]],
) -> list[int]:
    """A prompt's token ids (text through ``tokenize``), checked against the model."""
    ids = tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {info.vocab_size})")
    if sampling.max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if len(ids) + sampling.max_tokens > info.max_model_len:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
            f"max_model_len {info.max_model_len}"
        )
    return ids


class Jobs:
    """The running jobs of one vLLM ``LLMEngine`` (see module docstring)."""

    def __init__(self, llm, route_dtype: np.dtype) -> None:
        self.llm = llm
        self.route_dtype = route_dtype
        self.running: dict[str, Job] = {}  # vLLM request id -> job

    def __bool__(self) -> bool:
        return bool(self.running)

    # -- requests ---------------------------------------------------------------------------------
    def start(self, job: Job, version: int) -> None:
        """Add the job's prompts as vLLM requests; a refused one fails the whole job."""
        from vllm.inputs import TokensPrompt

        job.version = version
        try:
            for i, ids in enumerate(job.prompts):
                rid = request_id(job.key, i)
                params = _sampling_params(job, i)
                self.llm.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
                self.running[rid] = job
                job.pending.add(rid)
        except Exception as e:
            self.abort(job)
            resolve(job.future, error=e if isinstance(e, ValueError) else RequestRejected(str(e)))

    def abort(self, job: Job) -> None:
        ids = list(job.pending)
        for rid in ids:
            self.running.pop(rid, None)
        if ids:
            self.llm.abort_request(ids)
        job.pending.clear()

    def fail_running(self, exc: Exception) -> None:
        """A step failed: abort every running request and fail their jobs."""
        jobs = {id(j): j for j in self.running.values()}.values()
        self.llm.abort_request(list(self.running))
        self.running.clear()
        err = EngineStepError(f"the engine step failed: {exc!r}")
        for job in jobs:
            job.pending.clear()
            if not job.future.done():
                resolve(job.future, error=err)

    def jobs(self) -> list[Job]:
        return list({id(j): j for j in self.running.values()}.values())

    # -- outputs ----------------------------------------------------------------------------------
    def on_output(self, out) -> None:
        """One ``RequestOutput`` of a step: stream it and/or finish its request."""
        job = self.running.get(out.request_id)
        if job is None:
            return
        if job.on_event is not None:
            self._stream(job, out)
        if out.finished:
            self._finish(job, out)

    def _finish(self, job: Job, out) -> None:
        self.running.pop(out.request_id, None)
        job.outputs[prompt_index(out.request_id)] = out
        job.pending.discard(out.request_id)
        if job.pending:
            return
        try:
            resolve(job.future, [] if job.on_event else self._rollouts(job))
        except Exception as e:
            resolve(job.future, error=e)

    def _rollouts(self, job: Job) -> list[Rollout]:
        rollouts, wanted = [], []
        for i in range(len(job.prompts)):
            out = job.outputs[i]
            for c in sorted(out.outputs, key=lambda c: c.index):
                key = store_key(request_id(job.key, i), c.index)
                wanted.append((key, route_rows(len(out.prompt_token_ids), len(c.token_ids))))
                rollouts.append(
                    Rollout(
                        prompt_index=i,
                        sample_index=c.index,
                        prompt_token_ids=list(out.prompt_token_ids),
                        output_token_ids=list(c.token_ids),
                        logprobs=_logprobs(c) if job.return_logprobs else None,
                        routes=None,
                        finish_reason=c.finish_reason or "length",
                        weight_version=job.version,
                        prompt_logprobs=_prompt_logprobs(out, job.sampling),
                        **_extras(c, job),
                    )
                )
        if job.return_routes:
            got = self.llm.collective_rpc("pr2_take_routes", args=(wanted,))[0]
            for r, (key, rows) in zip(rollouts, wanted, strict=True):
                if key not in got:
                    raise RuntimeError(f"routes missing for {key}")
                r.routes = self._array(got[key])
                if len(r.routes) != rows:
                    raise RuntimeError(f"routes for {key} have {len(r.routes)} rows, not {rows}")
        return rollouts

    def _stream(self, job: Job, out) -> None:
        """Emit the step's new tokens of a streaming job, with the route rows now known."""
        i = prompt_index(out.request_id)
        peeks, events = [], []
        for c in out.outputs:
            sent = job.streamed.setdefault((i, c.index), [0, 0])  # tokens, route rows sent
            first = sent[0] == 0
            sent[0] += len(c.token_ids)
            events.append(
                StreamEvent(
                    prompt_index=i,
                    sample_index=c.index,
                    prompt_token_ids=list(out.prompt_token_ids) if first else None,
                    token_ids=list(c.token_ids),
                    logprobs=_logprobs(c) if job.return_logprobs else None,
                    routes=None,
                    routes_start=sent[1],
                    finish_reason=c.finish_reason,
                    weight_version=job.version,
                    **_extras(c, job),
                )
            )
            if job.return_routes:
                rows_known = route_rows(len(out.prompt_token_ids), sent[0])
                key = store_key(out.request_id, c.index)
                peeks.append((key, sent[1], rows_known, c.finish_reason is not None))
                sent[1] = rows_known
        if peeks:
            got = self.llm.collective_rpc("pr2_stream_routes", args=(peeks,))[0]
            for ev, (key, *_rest) in zip(events, peeks, strict=True):
                ev.routes = self._array(got[key])
        for ev in events:
            job.on_event(ev)

    def _array(self, raw: tuple[bytes, tuple]) -> np.ndarray:
        data, shape = raw
        return np.frombuffer(data, dtype=self.route_dtype).reshape(shape)


def _logprobs(completion) -> list[float]:
    """The sampled tokens' log-probs of one vLLM ``CompletionOutput``."""
    pairs = zip(completion.logprobs, completion.token_ids, strict=True)
    return [lp[t].logprob for lp, t in pairs]


def _top(position) -> TopLogprobs | None:
    """One position's vLLM ``{id: Logprob}`` as ``{id: (logprob, rank)}`` (order kept)."""
    if position is None:
        return None
    return {int(t): (float(lp.logprob), lp.rank) for t, lp in position.items()}


def _extras(completion, job: Job) -> dict[str, Any]:
    """The dialect fields of a completion (or its delta): text, stop reason, top log-probs."""
    s = job.sampling
    top = job.return_logprobs and s.top_logprobs > 0
    return {
        "text": completion.text if _detokenize(s) else None,
        "stop_reason": completion.stop_reason,
        "top_logprobs": [_top(p) for p in completion.logprobs] if top else None,
    }


def _prompt_logprobs(out, s: Sampling) -> list[TopLogprobs | None] | None:
    if s.prompt_logprobs is None or out.prompt_logprobs is None:
        return None
    return [_top(p) for p in out.prompt_logprobs]


def _detokenize(s: Sampling) -> bool:
    return s.detokenize or bool(s.stop)  # vLLM matches stop strings on the text


def _sampling_params(job: Job, i: int):
    """vLLM ``SamplingParams`` of prompt ``i`` of ``job`` (seeds differ per prompt)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = job.sampling
    extra: dict[str, Any] = {}
    if job.return_routes:
        extra[ROUTE_KEY] = request_id(job.key, i)
    if s.fault:
        extra["pr2_fault"] = s.fault
    return SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        max_tokens=s.max_tokens,
        seed=None if s.seed is None else s.seed + i * s.n,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.top_logprobs if job.return_logprobs else None,
        prompt_logprobs=s.prompt_logprobs,
        # all n samples in one final output; streaming: only what is new
        output_kind=RequestOutputKind.DELTA if job.on_event else RequestOutputKind.FINAL_ONLY,
        # rollouts are token ids unless text is asked for; text costs ~10% on small models
        detokenize=_detokenize(s),
        extra_args=extra or None,
    )
