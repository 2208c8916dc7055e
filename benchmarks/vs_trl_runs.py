"""The two sides of ``benchmarks/vs_trl.py``, each run in this process: TRL's ``GRPOTrainer``
(its config mapped from pr2's ``TrainConfig``: the table in ``benchmarks/vs_trl.py``'s docstring)
and ``pr2-train`` against a running ``pr2-serve``; the same figures from both (step end times,
rollout rewards, phase medians, completion lengths, held-out accuracy)."""

from __future__ import annotations

import itertools
import statistics
import time


def trl_config(cfg, out: str):
    """TRL's ``GRPOConfig`` matching the pr2 ``TrainConfig`` (the table in
    ``benchmarks/vs_trl.py``'s docstring)."""
    from trl import GRPOConfig

    per_step = cfg.prompts_per_batch * cfg.samples_per_prompt
    return GRPOConfig(
        output_dir=out,
        num_generations=cfg.samples_per_prompt,
        per_device_train_batch_size=per_step // cfg.off_policy_steps,
        steps_per_generation=cfg.off_policy_steps,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_steps=cfg.steps * cfg.off_policy_steps,
        max_completion_length=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.grad_clip,
        epsilon=cfg.clip_eps,
        beta=0.0,
        loss_type="bnpo",
        scale_rewards="group",
        router_aux_loss_coef=cfg.load_balance_coef,
        shuffle_dataset=False,
        seed=cfg.seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def trl_reward(cfg, record: list[float]):
    """pr2's reward function of ``cfg`` (the same object ``pr2-train`` loads), recording each
    generated batch's mean into ``record``."""
    from trainer.data.rewards import load_reward

    [spec] = cfg.reward
    fn = load_reward(spec).fn

    def reward(prompts, completions, completion_ids, **columns):
        values = fn(prompts, completions, completion_ids, **columns)
        record.append(statistics.mean(values))
        return values

    reward.__name__ = getattr(fn, "__name__", spec)
    return reward


def rate(ends: list[float]) -> float:
    """Steps/s after the first step, from the times at which steps ended."""
    return (len(ends) - 1) / (ends[-1] - ends[0])


def summary(ends: list[float], rewards: list[float], last: int) -> dict:
    secs = [round(b - a, 3) for a, b in itertools.pairwise(ends)]
    return {
        "steps_per_s": rate(ends),
        "median_s_per_step": statistics.median(secs),
        "step_seconds": secs,
        "rewards": [round(r, 4) for r in rewards],
        "reward_first": statistics.mean(rewards[:last]),
        "reward_last": statistics.mean(rewards[-last:]),
    }


def completion_lengths() -> float | None:
    """The mean length of the completions :func:`digit_share` scored since the last call."""
    import benchmarks.vs_trl as me  # (the module the trainers load the reward from)

    lengths, me.COMPLETION_LENGTHS[:] = list(me.COMPLETION_LENGTHS), []
    return statistics.mean(lengths) if lengths else None


def greedy_accuracy(model, tokenizer, examples, max_tokens: int) -> float:
    """Mean ``toy`` reward of greedy completions (``model.generate``) of ``examples``."""
    import torch

    from trainer.data.rewards import toy

    tokenizer.padding_side = "left"
    enc = tokenizer([ex.prompt for ex in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ids = out[:, enc["input_ids"].shape[1] :].tolist()
    answers = [ex.columns["answer"] for ex in examples]
    return statistics.mean(toy(None, None, ids, answer=answers))


def _timed(record: list[float], fn):
    def timed(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        record.append(time.perf_counter() - t)
        return out

    return timed


def run_trl(cfg, rows, eval_examples, out: str, last: int, log) -> dict:
    """TRL's GRPOTrainer on ``rows``; per-step end times, phases and rollout rewards, final
    held-out accuracy (``eval_examples``; None: not measured)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    rewards: list[float] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % cfg.off_policy_steps == 0:  # a rollout batch is done
                ends.append(time.perf_counter())
                step = state.global_step // cfg.off_policy_steps
                dt = ends[-1] - ends[-2] if len(ends) > 1 else float("nan")
                log(f"  trl step {step}/{cfg.steps}: {dt:.2f} s, reward {rewards[-1]:.3f}")

    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward(cfg, rewards),
        args=trl_config(cfg, out),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # (its end-of-training dict of metrics)
    generate_s: list[float] = []  # HF generate
    scored_s: list[float] = []  # generation + old log-probs + rewards + advantages
    trainer._generate = _timed(generate_s, trainer._generate)
    trainer._generate_and_score_completions = _timed(
        scored_s, trainer._generate_and_score_completions
    )
    completion_lengths()
    trainer.train()
    res = summary(ends, rewards, last)
    res["mean_completion_tokens"] = completion_lengths()
    res["experts_implementation"] = trainer.model.config._experts_implementation
    # step k (k >= 2) ran from the end of step k-1: its generation + scoring, then its updates
    train_s = [b - a - s for a, b, s in zip(ends, ends[1:], scored_s[1:], strict=False)]
    res["median_time_generate"] = statistics.median(generate_s[1:] or generate_s)
    res["median_time_generate_and_score"] = statistics.median(scored_s[1:] or scored_s)
    res["median_time_train"] = statistics.median(train_s)
    res["heldout_accuracy"] = (
        greedy_accuracy(trainer.model.eval(), tokenizer, eval_examples, cfg.max_tokens)
        if eval_examples is not None
        else None
    )
    return res


def run_pr2(cfg, last: int, log, heldout: bool) -> dict:
    """``pr2-train`` (in process) against the server of ``cfg``; the same figures as TRL's."""
    from trainer.run.loop import Trainer

    ends: list[float] = []

    def on_step(m: dict) -> None:
        ends.append(time.perf_counter())
        dt = ends[-1] - ends[-2] if len(ends) > 1 else float("nan")
        log(
            f"  pr2 K={cfg.max_staleness} step {m['step']}/{cfg.steps}: {dt:.2f} s, "
            f"reward {m['reward_mean']:.3f}"
        )

    completion_lengths()
    with Trainer(cfg, log=lambda _: None) as trainer:
        rows = trainer.run(on_step)
        lengths = completion_lengths()
        accuracy = trainer.evaluate() if heldout else None
        experts = trainer.policy.model.config._experts_implementation
    res = summary(ends, [m["reward_mean"] for m in rows], last)
    res["mean_completion_tokens"] = lengths
    res["heldout_accuracy"] = accuracy
    res["experts_implementation"] = experts
    later = rows[1:] or rows
    median = lambda *keys: statistics.median(sum(m[k] for k in keys) for m in later)  # noqa: E731
    res["median_time_rollout_wait"] = median("time_rollout")
    res["median_time_generate_request"] = statistics.median(  # (synchronous: the wait itself)
        m["time_rollout_request"] if m["time_rollout_request"] is not None else m["time_rollout"]
        for m in later
    )
    res["median_time_old_pass_and_train"] = median("time_old_pass", "time_train")
    res["median_time_push"] = median("time_push")
    return res
