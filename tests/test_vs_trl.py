"""benchmarks/vs_trl.py's fairness pieces: TRL's GRPOConfig mirrors the pr2 config of each
workload, and TRL's sampler feeds it pr2's prompts step by step (no run: seconds); the
generation-heavy workload differs from the demo's only where it says; and a ``--smoke`` run of
TRL's side on it (a tiny model, 2 steps: the phases and lengths are recorded; no time asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks.vs_trl import GEN, GEN_TOKENS, WORKLOADS, main, pr2_rows, workload_config
from benchmarks.vs_trl_runs import trl_config


def _cfg(model, tmp_path, workload="demo", steps=3):
    return workload_config(workload, "http://unused", None, model, tmp_path, steps, 0)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_trl_config_mirrors_the_pr2_config(workload, tiny_zero, tmp_path):
    cfg = _cfg(tiny_zero, tmp_path, workload)
    g = trl_config(cfg, str(tmp_path / "trl"))
    per_step = {"demo": 256, "gen": 32}[workload]
    assert g.generation_batch_size == cfg.prompts_per_batch * cfg.samples_per_prompt == per_step
    assert g.num_generations == cfg.samples_per_prompt
    assert g.steps_per_generation == cfg.off_policy_steps  # one Adam update per mini-step
    assert (g.num_iterations, g.gradient_accumulation_steps) == (1, 1)
    assert g.max_steps == cfg.steps * cfg.off_policy_steps
    assert g.max_completion_length == cfg.max_tokens and g.temperature == cfg.temperature
    assert (g.learning_rate, g.max_grad_norm, g.epsilon) == (cfg.lr, cfg.grad_clip, cfg.clip_eps)
    assert g.lr_scheduler_type == "constant" and g.weight_decay == 0.0
    assert (g.beta, g.loss_type, g.router_aux_loss_coef) == (0.0, "bnpo", 0.0)
    assert g.shuffle_dataset is False


@pytest.mark.parametrize("workload", WORKLOADS)
def test_trl_sampler_gives_pr2_prompts_in_step_order(workload, tiny_zero, tmp_path):
    from trl.trainer.utils import RepeatSampler

    from trainer.data.source import Source, load_tokenizer

    cfg = _cfg(tiny_zero, tmp_path, workload)
    rows, eval_examples = pr2_rows(cfg, cfg.steps)
    g = trl_config(cfg, str(tmp_path / "trl"))
    sampler = RepeatSampler(  # as GRPOTrainer._get_train_sampler builds it
        rows,
        mini_repeat_count=g.num_generations,
        batch_size=g.generation_batch_size // g.num_generations,
        repeat_count=g.num_iterations * g.steps_per_generation,
        shuffle=g.shuffle_dataset,
        seed=g.seed,
    )
    order = list(sampler)
    per_generation = g.generation_batch_size * g.steps_per_generation  # (repeats, then reused)
    src = Source(cfg, load_tokenizer(cfg.model_dir), max_model_len=1 << 20)
    for step in range(1, cfg.steps + 1):
        chunk = order[(step - 1) * per_generation :][: g.generation_batch_size]
        prompts = [rows[i]["prompt"] for i in chunk[:: g.num_generations]]
        answers = [rows[i]["answer"] for i in chunk[:: g.num_generations]]
        want = src.batch(step).examples
        assert prompts == [ex.prompt for ex in want]
        assert answers == [ex.columns["answer"] for ex in want]
    assert [ex.prompt for ex in eval_examples] == [ex.prompt for ex in src.eval_batch().examples]


def test_gen_workload_is_the_demo_with_long_completions_and_a_dense_reward(tiny_zero, tmp_path):
    from trainer.data.rewards import load_reward

    demo, gen = (_cfg(tiny_zero, tmp_path, w) for w in ("demo", "gen"))
    assert (demo.max_tokens, gen.max_tokens) == (6, GEN_TOKENS) == (6, 128)
    assert (demo.reward, gen.reward) == (["toy"], ["benchmarks.vs_trl:digit_share"])
    rest = lambda c: {k: v for k, v in vars(c).items() if k not in GEN}  # noqa: E731
    assert rest(gen) == rest(demo)  # same lr, clip, replay, off-policy split, prompts source
    # the prompts of each step are the demo step's first ones (the same data, fewer per step)
    rows, demo_rows = pr2_rows(gen, gen.steps)[0], pr2_rows(demo, demo.steps)[0]
    n, m = gen.prompts_per_batch, demo.prompts_per_batch
    for step in range(gen.steps):
        assert rows[step * n : (step + 1) * n] == demo_rows[step * m : step * m + n]
    digits = load_reward(gen.reward[0]).fn  # what pr2-train and the TRL side both call
    ids = [[ord("4"), ord("2"), 256], [ord("x")] * 128]
    assert digits(None, ["", ""], ids) == [2 / 128, 0.0]


def test_smoke_run_of_trl_on_the_gen_workload(tmp_path):
    out = tmp_path / "vs_trl.json"
    main(["--smoke", "--workloads", "gen", "--runs", "trl", "--out", str(out)])
    res = json.loads(out.read_text())["results"]["workloads"]["gen"]
    assert res["config"]["reward"] == ["benchmarks.vs_trl:digit_share"]
    [run] = res["runs"]["trl"]
    assert len(run["rewards"]) == res["config"]["steps"] == 2
    trl = res["table"]["trl"]
    assert 0 < trl["mean_completion_tokens"] <= res["config"]["max_tokens"]
    assert set(trl["median_time"]) == {"generate", "generate_and_score", "train"}
    assert trl["heldout_accuracy"] is None and res["ratio_steps_per_s"] == {}
