"""The trainer checks every received sample's routes: a sample whose routes cannot be replayed
(ids out of range, wrong row or layer count, an expert twice in one row, no routes) drops its
whole GRPO group, counted in ``dropped_bad_routes``, and training goes on with the rest.

No vLLM: the servers are stubbed (``trainer.run.loop.make_client``), the policy is the real tiny
model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import trainer.run.loop as loop
from pr2_serve.core.fingerprint import fingerprints, tensor_digest
from pr2_serve.core.route_protocol import route_rows
from pr2_serve.core.types import Rollout
from trainer.data.tasks import EOS, Task, decode, encode
from trainer.rollouts import weight_agreement as sync
from trainer.run.config import TrainConfig
from trainer.run.loop import RouteShape, screen_groups

# prompt -> (sample index, how its routes are broken); the other groups are good
BROKEN = {
    0: (1, "out of range"),
    1: (0, "rows"),
    2: (1, "layers"),
    3: (0, "repeated"),
    4: (1, "none"),
}
REASONS = {
    "out of range": ">= num_experts",
    "rows": "rows, the sample needs",
    "layers": "routes shape",
    "repeated": "repeats an expert id",
    "none": "no routes",
}


def good_routes(rng, rows: int, shape: RouteShape) -> np.ndarray:
    """Distinct ids per (row, layer), as a server returns them."""
    ids = [
        rng.permutation(shape.num_experts)[: shape.top_k] for _ in range(rows * shape.num_layers)
    ]
    return np.array(ids, dtype=np.uint8).reshape(rows, shape.num_layers, shape.top_k)


def broken_routes(kind: str, rng, rows: int, shape: RouteShape) -> np.ndarray | None:
    routes = good_routes(rng, rows, shape)
    if kind == "out of range":
        routes[rows // 2, 0, 0] = shape.num_experts
    elif kind == "rows":
        routes = routes[:-1]
    elif kind == "layers":
        extra = shape.num_layers + 1
        routes = good_routes(rng, rows, RouteShape(extra, shape.top_k, shape.num_experts))
    elif kind == "repeated":
        routes[0, 0, :] = 0  # a hole filled with zeros
    elif kind == "none":
        return None
    return routes


def sample(prompt_index, sample_index, prompt, version, routes_of, rng) -> Rollout:
    """Sample 0 of a group answers an addition prompt right (reward 1), the others not."""
    text, _ = decode(prompt)  # "a+b="
    right = "+" in text and sample_index == 0
    total = sum(int(x) for x in text.rstrip("=").split("+")) if right else 0
    output = [*encode(str(total)), EOS] if right else [48, 48, 48]
    return Rollout(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_token_ids=list(prompt),
        output_token_ids=output,
        logprobs=(-rng.random(len(output)) - 0.5).tolist(),
        routes=routes_of(route_rows(len(prompt), len(output))),
        finish_reason="length",
        weight_version=version,
    )


class FakeServer:
    """``info``, ``generate``, ``push_weights``, ``close`` of a rollout client; samples of the
    prompts in ``BROKEN`` get the broken routes."""

    def __init__(self) -> None:
        self.version = 0
        self.shape: RouteShape | None = None  # the trainer's, set once it exists
        self.rng = np.random.default_rng(0)
        self.pushes: list[int] = []
        self.fingerprints: dict[str, str] = {}  # what it serves (set to the trainer's start)

    def serve_start_of(self, model_dir, monkeypatch, replay: str = "pr2"):
        """Serve what a run of ``replay`` on ``model_dir`` starts from, as the trainer's only
        server (``trainer.run.loop.make_client`` patched); returns ``self``."""
        start = sync.starting_target(model_dir, replay).fingerprints
        self.fingerprints = {f"{part}_fingerprint": fp for part, fp in start.items()}
        monkeypatch.setattr(loop, "make_client", lambda address, api_key: self)
        return self

    def info(self) -> dict:
        return {"weight_version": self.version, "max_model_len": 2048, **self.fingerprints}

    def generate(self, prompts, n, seed, min_weight_version, **sampling):
        assert min_weight_version <= self.version
        samples = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                kind = BROKEN[i][1] if BROKEN.get(i, (None,))[0] == j else None
                samples.append(sample(i, j, prompt, self.version, self.routes(kind), self.rng))
        return SimpleNamespace(weight_version=self.version, samples=samples)

    def routes(self, kind: str | None):
        """Routes of a sample (``kind``: how they are broken; None: good) by row count."""
        if kind is None:
            return lambda rows: good_routes(self.rng, rows, self.shape)
        return lambda rows: broken_routes(kind, self.rng, rows, self.shape)

    def push_weights(self, path, version: int) -> dict:
        if isinstance(path, dict):  # tensors (sync.serve_exactly): it now serves them
            digests = {n: tensor_digest(n, t) for n, t in path.items()}
            self.fingerprints = {f"{k}_fingerprint": v for k, v in fingerprints(digests).items()}
        self.version = version
        self.pushes.append(version)
        return {"weight_version": version}

    def close(self) -> None:
        pass


@pytest.mark.timeout(300)
def test_bad_routes_drop_their_group_and_training_goes_on(tiny_random, tmp_path, monkeypatch):
    server = FakeServer().serve_start_of(tiny_random, monkeypatch)
    cfg = TrainConfig(
        servers=["http://fake"],
        model_dir=str(tiny_random),
        replay="pr2",
        predictor="learned",
        off_policy_steps=2,
        prompts_per_batch=8,
        samples_per_prompt=2,
        max_tokens=4,
        lr=1e-3,
        steps=2,
        eval_every=0,
        output_dir=str(tmp_path),
        api_key="unused",
    )
    lines: list[str] = []
    with loop.Trainer(cfg, log=lines.append) as trainer:
        server.shape = trainer.route_shape
        history = trainer.run()
    per_step = 2 * len(BROKEN)  # whole groups of 2
    assert [m["dropped_bad_routes"] for m in history] == [per_step, 2 * per_step]  # cumulative
    assert [m["dropped_stale"] for m in history] == [0, 0]
    assert lines[0].startswith("precision: server unknown vs trainer float32")  # start-up line
    lines = [x for x in lines if x.startswith("step ")]
    assert len(lines) == 2 * len(BROKEN)
    for prompt, (index, kind) in BROKEN.items():
        [line] = [x for x in lines[: len(BROKEN)] if f"group of prompt {prompt} " in x]
        assert line.startswith("step 1: ") and f"sample {index}: " in line, line
        assert REASONS[kind] in line, line
    for m in history:  # the 3 good groups were trained on, and pushed
        assert m["reward_mean"] == 0.5
        assert m["loss"] is not None and m["grad_norm"] > 0
        assert m["first_ratio_max_dev"] == 0.0  # the good routes were replayed
        assert m["predictor_loss"] is not None
    assert server.pushes == [1, 2]
    assert history[1]["rollout_versions"] == [1]


def test_screen_groups_counts_stale_before_routes():
    shape = RouteShape(num_layers=2, top_k=2, num_experts=4)
    rng = np.random.default_rng(1)
    task = Task("addition", 2)
    problems = task.batch(3, seed=0)
    prompt = [1, 2, 3]

    def group(i, version, routes_of):
        return [sample(i, j, prompt, version, routes_of, rng) for j in range(2)]

    def good(rows):
        return good_routes(rng, rows, shape)

    def bad(rows):
        return broken_routes("repeated", rng, rows, shape)

    groups = [group(0, 5, good), group(1, 3, bad), group(2, 5, bad)]
    lines: list[str] = []
    scored = []

    def score(examples, kept):  # one call per batch, with the kept groups only
        scored.append((examples, kept))
        return [0.5] * sum(map(len, kept)), {"fake": 0.5}

    got = screen_groups(groups, problems, 5, 1, shape, score, log=lines.append)
    # group 1 is both stale and bad: counted as stale; group 2 is bad
    assert (got.dropped_stale, got.dropped_bad_routes) == (2, 2)
    assert got.samples == groups[0] and got.examples == problems[:1]
    assert scored == [(problems[:1], groups[:1])] and got.reward_means == {"fake": 0.5}
    assert got.rewards.tolist() == [0.5, 0.5]
    assert len(lines) == 1 and "prompt 2" in lines[0] and "repeats an expert id" in lines[0]
