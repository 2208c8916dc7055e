"""The canary: a short fixed greedy generate that weights must pass before they are served.

After a weight update is applied and before it is committed, the engine runs
:attr:`Canary.prompts` greedily (a few prompts, a few tokens, with log-probs and routes) and asks
:meth:`Canary.check` whether the result is servable; on a problem it restores the previous
weights and refuses the update. The same check runs at start-up (the warm-up request), and
:func:`output_problem` is the rule every served sample is held to (a non-finite log-prob is never
sent). Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pr2_serve.core.route_protocol import route_rows
from pr2_serve.core.types import EngineInfo, Rollout, Sampling

__all__ = ["Canary", "output_problem", "routes_problem"]

PROMPT_LEN = 8
MAX_TOKENS = 4
STARTS = (1, 97, 301)  # three prompts of consecutive ids (modulo the vocabulary)


def output_problem(rollouts: Sequence[Rollout]) -> str | None:
    """Why these samples must not be served (a non-finite log-prob), or None."""
    for r in rollouts:
        for i, lp in enumerate(r.logprobs or ()):
            if not math.isfinite(lp):
                return (
                    f"sample (prompt {r.prompt_index}, sample {r.sample_index}) has a "
                    f"non-finite log-prob ({lp}) at output position {i}"
                )
    return None


def routes_problem(routes: np.ndarray | None, rows: int, info: EngineInfo) -> str | None:
    """Why a sample's routes are invalid (shape, expert ids out of range, repeated experts in
    one top-k), or None."""
    want = (rows, info.num_moe_layers, info.top_k)
    if routes is None or tuple(routes.shape) != want:
        got = None if routes is None else list(routes.shape)
        return f"routes have shape {got}, expected {list(want)}"
    if routes.size and int(routes.max()) >= info.num_experts:
        return f"route expert id {int(routes.max())} >= num_experts {info.num_experts}"
    if info.top_k > 1 and routes.size:
        ids = np.sort(routes.astype(np.int64), axis=-1)
        if (np.diff(ids, axis=-1) == 0).any():
            return "a route picks the same expert twice in one top-k"
    return None


@dataclass
class Canary:
    """The fixed canary of one served model; ``seconds`` is set by the engine that ran it."""

    info: EngineInfo
    seconds: float = 0.0
    prompts: list[list[int]] = field(init=False)
    sampling: Sampling = field(init=False)

    def __post_init__(self) -> None:
        v = self.info.vocab_size
        self.prompts = [[(s + i) % v for i in range(PROMPT_LEN)] for s in STARTS]
        tokens = max(1, min(MAX_TOKENS, self.info.max_model_len - PROMPT_LEN))
        self.sampling = Sampling(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def check(self, rollouts: Sequence[Rollout]) -> str | None:
        """The first reason these canary samples show the weights are not servable, or None:
        one sample per prompt, output ids in the vocabulary, finite log-probs, valid routes."""
        if len(rollouts) != len(self.prompts):
            return f"{len(rollouts)} canary samples for {len(self.prompts)} prompts"
        if problem := output_problem(rollouts):
            return problem
        for r in rollouts:
            if any(not 0 <= t < self.info.vocab_size for t in r.output_token_ids):
                return f"canary prompt {r.prompt_index}: output token outside the vocabulary"
            rows = route_rows(len(r.prompt_token_ids), len(r.output_token_ids))
            if problem := routes_problem(r.routes, rows, self.info):
                return f"canary prompt {r.prompt_index}: {problem}"
        return None
