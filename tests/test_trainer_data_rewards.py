"""Datasets in TRL's formats and reward functions with TRL's signature (pure, no engine)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from trainer.data.prompt_data import (
    DatasetError,
    batch_indices,
    encode_all,
    load_examples,
    prompt_ids,
    split_eval,
)
from trainer.data.rewards import RewardError, load_reward, load_rewards, score

ROWS = [
    {"prompt": [{"role": "user", "content": "Ann has 3 apples and gets 4 more."}], "answer": "7"},
    {"prompt": [{"role": "user", "content": "Bob has 10 pens and gets 5 more."}], "answer": "15"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_formats_load_with_columns(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        import datasets

        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    ex = load_examples(str(path))
    assert [e.columns["answer"] for e in ex] == ["7", "15"]
    assert ex[0].prompt[0]["role"] == "user"


def test_standard_format_and_toy_tasks_go_the_same_way(tmp_path):
    ex = load_examples(str(_jsonl(tmp_path / "s.jsonl", [{"prompt": "2+3=", "answer": "5"}])))
    assert ex[0].prompt == "2+3=" and ex[0].columns == {"answer": "5"}
    toy = load_examples("toy:addition", toy_size=8)
    assert len(toy) == 8 and all(isinstance(e.prompt, str) and "answer" in e.columns for e in toy)


@pytest.mark.parametrize(
    "rows, words",
    [
        ([{"question": "x"}], r"row 0: missing field 'prompt'"),
        ([{"prompt": "ok"}, {"prompt": "  "}], r"row 1: field 'prompt' is an empty prompt"),
        ([{"prompt": []}], r"row 0: field 'prompt' is an empty conversation"),
        ([{"prompt": [{"content": "hi"}]}], r"row 0: prompt\[0\] must be"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, words):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=rf"bad.jsonl: {words}"):
        load_examples(str(path))


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(DatasetError, match=r"d.csv: unknown format '.csv'"):
        load_examples(str(tmp_path / "d.csv"))
    with pytest.raises(DatasetError, match="toy:nope: unknown toy task"):
        load_examples("toy:nope")


def test_chat_prompts_use_the_checkpoint_template_and_long_prompts_are_refused(tmp_path):
    from transformers import AutoTokenizer

    from pr2_serve.tiny.tiny_model import make_tiny_model

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "m", tokenizer="bpe"))
    ex = load_examples(str(_jsonl(tmp_path / "c.jsonl", ROWS)))
    ids = prompt_ids(ex[0], tok)
    want = tok.apply_chat_template(ROWS[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == want
    with pytest.raises(DatasetError, match=r"c.jsonl: row 0: prompt of \d+ tokens exceeds"):
        encode_all(ex, lambda e: prompt_ids(e, tok), "c.jsonl", limit=5)


def test_split_and_epochs_are_seeded_and_cover_every_row():
    ex = load_examples("toy:addition", toy_size=20)
    train, ev = split_eval(ex, 0.25, seed=1)
    assert len(ev) == 5 and len(train) == 15 and split_eval(ex, 0.25, 1)[1] == ev
    rows = [i for step in (1, 2, 3) for i in batch_indices(15, 5, step, seed=0)]
    assert sorted(rows) == list(range(15))  # one epoch = every row once
    assert batch_indices(15, 5, 4, seed=0) != batch_indices(15, 5, 1, seed=0)  # reshuffled


def test_math_reward_uses_math_verify():
    r = load_reward("math")
    completions = ["The answer is $\\frac{1}{2}$.", "I think it is 3."]
    values = r.fn(["q1", "q2"], completions, [[1], [2]], answer=["0.5", "4"])
    assert values == [1.0, 0.0]


def test_user_reward_gets_columns_and_failures_name_the_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "seen = {}\n"
        "def by_len(prompts, completions, completion_ids, answer, difficulty, **kw):\n"
        "    seen['difficulty'] = difficulty\n"
        "    return [float(len(c)) for c in completions]\n"
        "def broken(prompts, completions, completion_ids, **kw):\n"
        "    raise KeyError('oops')\n"
        "def short(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = load_rewards(["my_rewards:by_len", "exact"], [0.5, 2.0])
    cols = {"answer": ["ab", "x"], "difficulty": [1, 2]}
    totals, means = score(rewards, ["p", "q"], ["ab", "xyz"], [[1], [2]], cols)
    assert totals == [0.5 * 2 + 2.0, 0.5 * 3]
    assert means == {"my_rewards:by_len": 2.5, "exact": 0.5}
    assert sys.modules["my_rewards"].seen["difficulty"] == [1, 2]
    for name, words in [("broken", "raised KeyError"), ("short", "returned 1 values for 2")]:
        with pytest.raises(RewardError, match=rf"'my_rewards:{name}' {words}"):
            score(load_rewards([f"my_rewards:{name}"]), ["p", "q"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(RewardError, match="cannot import"):
        load_reward("no_such_module:fn")


def test_config_data_fields_defaults_and_errors():
    from trainer.run.config import parse_config

    cfg = parse_config(["--task", "sort"])  # the demo's and the experiment's flags still work
    assert (cfg.dataset, cfg.reward) == ("toy:sort", ["toy"])
    cfg = parse_config(["--dataset", "d.jsonl", "--reward", "math", "--reward", "m:f"])
    assert (cfg.reward, cfg.reward_weights) == (["math", "m:f"], [])
    assert parse_config(["--dataset", "d.jsonl"]).reward == ["exact"]
    for argv, words in [
        (["--reward", "math", "--reward-weights", "1", "2"], "2 values for 1 reward"),
        (["--dataset", "d.jsonl", "--eval-fraction", "1.5"], r"eval_fraction must be in \[0, 1\)"),
        (["--eval-fraction", "0.1"], "not with eval_dataset or toy"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_config(argv)


def test_toy_source_gives_the_toy_tasks_ids_problems_and_rewards(tiny_zero, tmp_path):
    """``toy:<task>`` through the byte tokenizer of the tiny model: the same prompt ids, problems
    and rewards per step as the loop had with ``trainer.data.tasks`` (results stay comparable)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from trainer.data.source import Source
    from trainer.data.tasks import EOS, Task, encode, exact_match
    from trainer.run.config import TrainConfig

    cfg = TrainConfig(
        model_dir=str(tiny_zero),
        task="addition,sort",
        task_digits=3,
        prompts_per_batch=8,
        eval_size=16,
        seed=3,
        output_dir=str(tmp_path),
    )
    source = Source(cfg, AutoTokenizer.from_pretrained(str(tiny_zero)), max_model_len=2048)
    task = Task("addition,sort", 3)
    cases = [(source.batch(s), task.batch(8, seed=3 * 100003 + s)) for s in (1, 2)]
    cases.append((source.eval_batch(), task.batch(16, seed=3, split="eval")))
    for got, want in cases:
        assert got.ids == [encode(p.prompt) for p in want]
        assert [e.columns["answer"] for e in got.examples] == [p.answer for p in want]
    assert source.stop_token_ids == [EOS]
    ex, answer = cases[0][0].examples[0], cases[0][1][0].answer
    outputs = [
        [*encode(answer), EOS],
        encode(answer),  # cut off: no EOS
        [*encode(f" {answer}"), EOS],
        [*encode(answer), 257, 258],  # padded, no EOS
        [*encode(answer), 257, EOS],
        [*encode(answer + "1"), EOS],
    ]
    group = [SimpleNamespace(output_token_ids=o) for o in outputs]
    rewards, means = source.score([ex], [group])
    assert rewards == [exact_match(o, answer) for o in outputs] == [1, 0, 0, 0, 1, 0]
    assert means == {"toy": 2 / 6}


def _train_without_a_server(tiny_zero, tmp_path, *flags: str) -> tuple[SystemExit, float]:
    """``pr2-train`` against an address where nothing listens, with a 120 s server wait: what
    it exits with, and after how long."""
    import time

    from trainer.run.cli import main as train_main

    args = ["--servers", "http://127.0.0.1:9", "--model-dir", str(tiny_zero)]
    args += ["--server-timeout", "120", "--output-dir", str(tmp_path / "out"), *flags]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train_main(args)
    return e.value, time.perf_counter() - t0


def test_the_users_mistakes_are_found_before_any_server_is_waited_for(
    tiny_zero, tmp_path, monkeypatch, capsys
):
    """A missing dataset file, an unimportable reward and a reward function that raises are
    each reported in seconds with no server up (not after --server-timeout); the raising one
    prints its traceback in the user's own frames, then the one-line message (exit status 1)."""
    (tmp_path / "user_rewards_c.py").write_text(
        "def helper(texts):\n"
        "    return [len(t) / 0 for t in texts]\n"
        "\n"
        "def bad(prompts, completions, completion_ids, **kwargs):\n"
        "    return helper(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        (["--dataset", str(tmp_path / "missing.jsonl")], r"missing\.jsonl: no such file"),
        (["--reward", "no_such_module:fn"], r"no_such_module"),
        (["--reward", "user_rewards_c:bad"], r"'user_rewards_c:bad' raised ZeroDivisionError"),
    ]
    for flags, words in cases:
        capsys.readouterr()
        err, seconds = _train_without_a_server(tiny_zero, tmp_path, *flags)
        assert isinstance(err.code, str) and err.code.startswith("pr2-train: "), err.code
        assert re.search(words, err.code), (words, err.code)
        assert seconds < 60, (flags, seconds)  # the server wait is 120 s
    tb = capsys.readouterr().err
    assert tb.startswith("Traceback (most recent call last):"), tb
    assert 'user_rewards_c.py", line 5, in bad' in tb and "line 2, in helper" in tb
    assert tb.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "trainer" + "/" not in tb  # the trainer's own frames are left out
