"""benchmarks/vs_trl.py's fairness pieces: TRL's GRPOConfig mirrors the pr2 demo config, and
TRL's sampler feeds it pr2's prompts step by step (no run: seconds)."""

from __future__ import annotations

from benchmarks.staleness import demo_config
from benchmarks.vs_trl import pr2_rows, trl_config


def _cfg(model, tmp_path, steps=3):
    return demo_config("http://unused", None, str(model), tmp_path, steps, 0)


def test_trl_config_mirrors_the_pr2_config(tiny_zero, tmp_path):
    cfg = _cfg(tiny_zero, tmp_path)
    g = trl_config(cfg, str(tmp_path / "trl"))
    assert g.generation_batch_size == cfg.prompts_per_batch * cfg.samples_per_prompt == 256
    assert g.num_generations == cfg.samples_per_prompt
    assert g.steps_per_generation == cfg.off_policy_steps  # one Adam update per mini-step
    assert (g.num_iterations, g.gradient_accumulation_steps) == (1, 1)
    assert g.max_steps == cfg.steps * cfg.off_policy_steps
    assert g.max_completion_length == cfg.max_tokens and g.temperature == cfg.temperature
    assert (g.learning_rate, g.max_grad_norm, g.epsilon) == (cfg.lr, cfg.grad_clip, cfg.clip_eps)
    assert g.lr_scheduler_type == "constant" and g.weight_decay == 0.0
    assert (g.beta, g.loss_type, g.router_aux_loss_coef) == (0.0, "bnpo", 0.0)
    assert g.shuffle_dataset is False


def test_trl_sampler_gives_pr2_prompts_in_step_order(tiny_zero, tmp_path):
    from trl.trainer.utils import RepeatSampler

    from trainer.data.source import Source, load_tokenizer

    cfg = _cfg(tiny_zero, tmp_path)
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
