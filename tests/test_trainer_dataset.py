"""Training on your own data against a real ``pr2-serve``: a BPE tiny Qwen3-MoE (ChatML chat
template), a conversational JSONL of arithmetic word problems, ``--reward math`` (math-verify)
and a user reward module with TRL's signature; bad data refused before any rollout.

One server per module; runs are 1-3 steps of 4 prompts x 2 samples, 8 tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import trainer.run.loop as loop
from pr2_serve.client import HttpClient
from tests.helpers import API_KEY
from trainer.data.prompt_data import DatasetError
from trainer.data.rewards import RewardError
from trainer.run.cli import main as train_main
from trainer.run.config import TrainConfig

pytestmark = pytest.mark.vllm


class Recorder:
    """A rollout client that records every ``generate`` call and its result."""

    def __init__(self, client, calls: list) -> None:
        self._client, self._calls = client, calls

    def generate(self, prompts, **sampling):
        res = self._client.generate(prompts, **sampling)
        self._calls.append((prompts, sampling, res))
        return res

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.fixture
def calls(monkeypatch) -> list:
    """The trainer's ``generate`` calls (prompts, sampling, result), in order."""
    got: list = []
    make = loop.make_client
    monkeypatch.setattr(loop, "make_client", lambda a, k: Recorder(make(a, k), got))
    return got


def word_problems(n: int = 50, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        who = rng.choice(["Ann", "Bob", "Carla", "Dev"])
        what = rng.choice(["apples", "pens", "coins"])
        q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
        rows.append(
            {"prompt": [{"role": "user", "content": q}], "answer": str(a + b), "difficulty": i % 3}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    from pr2_serve.tiny.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bpe") / "m", seed=0, tokenizer="bpe")


@pytest.fixture(scope="module")
def tokenizer(bpe_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_model))


@pytest.fixture(scope="module")
def server(bpe_server):
    """The session's BPE server (its checkpoint is ``bpe_model``'s plus random predictors: a
    run's start-up agreement pushes the run's starting weights); back on its own after."""
    yield bpe_server
    client = HttpClient(bpe_server.http, api_key=API_KEY)
    client.rollback(0)
    client.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "problems.jsonl", word_problems())


def config(server, bpe_model, out: Path, **kw) -> TrainConfig:
    base = dict(
        servers=[server.http],
        model_dir=str(bpe_model),
        replay="r3",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        max_tokens=8,
        steps=1,
        eval_every=0,
        output_dir=str(out),
        api_key=API_KEY,
        lr=1e-3,
    )
    return TrainConfig(**{**base, **kw})


def template_ids(tokenizer, rows: list[dict]) -> dict[tuple, dict]:
    """Each row by its ``apply_chat_template(..., add_generation_prompt=True)`` ids."""
    out = {}
    for r in rows:
        ids = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
        out[tuple(ids["input_ids"] if hasattr(ids, "keys") else ids)] = r
    return out


@pytest.mark.parametrize("mode", ["r3", "pr2"])
def test_math_reward_on_chat_data(
    server, bpe_model, tokenizer, dataset, tmp_path, mode, calls, monkeypatch
):
    import math_verify

    verified = []
    real_verify = math_verify.verify
    monkeypatch.setattr(
        math_verify, "verify", lambda *a, **k: verified.append(1) or real_verify(*a, **k)
    )
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    address = server.http if mode == "pr2" else f"grpc://{server.grpc}"
    out = tmp_path / mode
    # fmt: off
    train_main([
        "--servers", address, "--model-dir", str(bpe_model), "--replay", mode,
        "--dataset", str(dataset), "--eval-fraction", "0.1", "--reward", "math",
        "--prompts-per-batch", "4", "--samples-per-prompt", "2", "--max-tokens", "8",
        "--steps", "3", "--eval-every", "3", "--eval-size", "4", "--output-dir", str(out),
    ])
    # fmt: on
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert rows[-1]["eval_accuracy"] is not None and "eval_accuracy" not in rows[0]
    by_ids = template_ids(tokenizer, word_problems())
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert len(calls) == 4  # 3 rollout batches, then the eval
    rewards = []
    for prompts, sampling, res in calls:
        assert set(sampling["stop_token_ids"]) == stops
        want = []
        for s in res.samples:
            # the served prompt is the row through the checkpoint's chat template
            row = by_ids[tuple(s.prompt_token_ids)]
            assert list(s.prompt_token_ids) == list(prompts[s.prompt_index])
            text = tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
            gold = math_verify.parse(row["answer"])
            want.append(float(bool(gold) and real_verify(gold, math_verify.parse(text))))
        rewards.append(sum(want) / len(want))
    assert [m["reward/math"] for m in rows] == pytest.approx(rewards[:3])
    assert [m["reward_mean"] for m in rows] == pytest.approx(rewards[:3])
    assert rows[-1]["eval_accuracy"] == pytest.approx(rewards[3])
    # every rollout and eval sample went through it, and the start-up's synthetic completion
    assert len(verified) == 3 * 8 + 4 + 1


def test_math_reward_scores_a_right_and_a_wrong_completion(bpe_model, tokenizer, dataset, tmp_path):
    from pr2_serve.core.types import Rollout
    from trainer.data.source import Source

    cfg = TrainConfig(
        model_dir=str(bpe_model), dataset=str(dataset), reward=["math"], output_dir=str(tmp_path)
    )
    source = Source(cfg, tokenizer, max_model_len=2048)
    ex = source.batch(1).examples[0]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def said(text: str) -> Rollout:
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        return Rollout(
            prompt_index=0,
            sample_index=0,
            prompt_token_ids=[1],
            output_token_ids=ids,
            logprobs=[0.0] * len(ids),
            routes=None,
            finish_reason="stop",
            weight_version=0,
        )

    answer = int(ex.columns["answer"])
    rewards, means = source.score([ex], [[said(f"So {answer}."), said(f"So {answer + 1}.")]])
    assert rewards == [1.0, 0.0] and means == {"math": 0.5}
    assert source.stop_token_ids == [eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def test_user_reward_module_gets_the_columns(
    server, bpe_model, dataset, tmp_path, monkeypatch, calls
):
    (tmp_path / "user_rewards_a.py").write_text(
        "seen = []\n"
        "def shorter(prompts, completions, completion_ids, answer, difficulty, **kwargs):\n"
        "    seen.append(dict(prompts=prompts, completions=completions,\n"
        "                     completion_ids=completion_ids, answer=answer,\n"
        "                     difficulty=difficulty))\n"
        "    return [1.0 / (1 + len(c[0]['content'])) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH=tmp_path would
    specs = ["math", "user_rewards_a:shorter"]
    cfg = config(server, bpe_model, tmp_path / "out", dataset=str(dataset), reward=specs)
    cfg.reward_weights = [1.0, 0.5]
    with loop.Trainer(cfg, log=lambda *a: None) as trainer:
        [m] = trainer.run()
    import user_rewards_a

    probe, seen = user_rewards_a.seen  # the start-up's synthetic completion, then the step's
    assert len(probe["completions"]) == 1 and probe["completions"][0][0]["role"] == "assistant"
    assert probe["answer"][0] in {r["answer"] for r in word_problems()}  # a row's columns
    by_prompt = {r["prompt"][0]["content"]: r for r in word_problems()}
    [(_, _, res)] = calls
    assert len(seen["completions"]) == len(res.samples) == 8
    for i, prompt in enumerate(seen["prompts"]):  # TRL's conversational format, every column
        row = by_prompt[prompt[0]["content"]]
        assert (seen["answer"][i], seen["difficulty"][i]) == (row["answer"], row["difficulty"])
        assert seen["completions"][i][0]["role"] == "assistant"
    assert seen["completion_ids"] == [s.output_token_ids for s in res.samples]
    assert m["reward/user_rewards_a:shorter"] > 0
    assert m["reward_mean"] == pytest.approx(
        m["reward/math"] + 0.5 * m["reward/user_rewards_a:shorter"]
    )


def test_a_raising_reward_stops_the_run_with_its_name(
    server, bpe_model, dataset, tmp_path, monkeypatch, calls
):
    """Called once on a synthetic completion before any server is asked anything: the run
    stops with the function's name; nothing was generated or pushed."""
    (tmp_path / "user_rewards_b.py").write_text(
        "def boom(prompts, completions, completion_ids, **kwargs):\n"
        "    raise ValueError('no answer column here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(
        server, bpe_model, tmp_path / "out", dataset=str(dataset), reward=["user_rewards_b:boom"]
    )
    client = HttpClient(server.http)
    version = client.info()["weight_version"]
    with pytest.raises(RewardError, match=r"'user_rewards_b:boom' raised ValueError: no ans"):
        loop.Trainer(cfg, log=lambda *a: None)
    assert client.info()["weight_version"] == version  # nothing pushed
    assert calls == [] and not (tmp_path / "out").exists()
    client.close()


LONG = " ".join(str(i) for i in range(3000))  # far more than 2048 - 8 tokens


@pytest.mark.parametrize(
    "name, rows, field, words",
    [
        ("missing.jsonl", None, "prompt", r"missing\.jsonl: no such file"),
        ("data.csv", "prompt\nhi\n", "prompt", r"data\.csv: unknown format '\.csv'"),
        ("d.jsonl", [{"prompt": "a"}, {"question": "b"}], "prompt", r"row 1: missing field"),
        ("d.jsonl", [{"q": "a"}], "question", r"d\.jsonl: row 0: missing field 'question'"),
        ("d.jsonl", [{"prompt": [{"role": "user", "content": " "}]}], "prompt", r"row 0: .*empty"),
        (
            "d.jsonl",  # (answers: the default reward, exact, is called once before the check)
            [{"prompt": "hi", "answer": "1"}, {"prompt": LONG, "answer": "2"}],
            "prompt",
            r"row 1: prompt of \d+ tok",
        ),
    ],
)
def test_bad_data_is_refused_before_any_rollout(
    server, bpe_model, tmp_path, calls, name, rows, field, words
):
    path = tmp_path / name
    if isinstance(rows, list):
        write_jsonl(path, rows)
    elif rows is not None:
        path.write_text(rows)
    cfg = config(server, bpe_model, tmp_path / "out", dataset=str(path), prompt_field=field)
    with pytest.raises(DatasetError, match=words):
        loop.Trainer(cfg)
    assert calls == []  # no generate request was made
