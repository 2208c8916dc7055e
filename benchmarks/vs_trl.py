"""Peer comparison: TRL's ``GRPOTrainer`` (its own generation, ``model.generate`` on the CPU, no
vLLM) vs ``pr2-train`` synchronous (``--max-staleness 0``) and asynchronous (``1``) against one
real ``pr2-serve`` (fp32, CPU), on the demo config, in one run: seconds per rollout step and
reward after N steps for each, and pr2 steps/s / TRL steps/s.

    PYTHONPATH=$PWD python -m benchmarks.vs_trl --model runs/demo/model

The config is the demo's (``benchmarks.staleness.demo_config``: the warmed-up tiny Qwen3-MoE,
``toy:addition`` 2 digits, pr2 replay with predictor lr x10, no periodic eval) and TRL gets the
same, field by field (:func:`trl_config`):

    pr2-train                          TRL GRPOConfig
    prompts_per_batch 32 x             generation_batch_size 256 = per_device_train_batch_size
      samples_per_prompt 8               128 x steps_per_generation 2; num_generations 8
    off_policy_steps 2 (the batch      steps_per_generation 2 (the generated batch is split into
      split into 2 mini-steps, one       2 optimizer steps; old log-probs from one pass at
      Adam update each, old pass)        generation time), num_iterations 1, grad accumulation 1
    steps N (rollout batches)          max_steps 2N (optimizer steps)
    max_tokens 6, temperature 1        max_completion_length 6, temperature 1, top_p 1, top_k 0
    lr 2e-4, Adam (0.9, 0.999, 1e-8)   learning_rate 2e-4, constant schedule, no warm-up, AdamW
      no weight decay                    weight_decay 0 (= Adam), same betas and eps
    grad_clip 1.0, clip_eps 0.2        max_grad_norm 1.0, epsilon 0.2
    no KL term                         beta 0 (no reference model)
    loss: token sum / the mini-step's  loss_type "bnpo" (token sum / the local batch's token
      token count (trainer/algo/ppo.py)       count: with one process and no accumulation, the same)
    GRPO advantages (r - mean) / std   scale_rewards "group": (r - mean) / (std + 1e-4), std
      (std unbiased=False, + 1e-6)       unbiased (a slightly smaller advantage scale)
    load_balance_coef 0                router_aux_loss_coef 0 (TRL turns the config's 0.001 on)
    reward toy (trainer.data.rewards.toy)   reward_funcs: the same function (TRL's signature)
    prompts of step s (Source.batch)   the same rows, in order (shuffle_dataset False)

Not matched: pr2 replays the served routes (``--replay pr2``, as in the demo) and trains the
evolution predictor (lr x10); TRL has no routing replay (its training forward routes itself).
TRL shuffles the samples of a generated batch before splitting it into its 2 optimizer steps;
pr2 splits by prompt groups. Sampling seeds differ (vLLM vs torch), so the samples differ.

A step is one rollout batch (generation of 256 samples + its 2 updates; pr2 also pushes the
weights to the server). Steps/s counts the steps after the first, from the wall time between
the ends of steps (the first includes warm-up; asynchronous pr2's first step is synchronous).
Reward after N steps: the mean rollout reward of the last ``--last`` steps (same function, same
prompts on both sides). Held-out accuracy: greedy, the toy eval split (``eval_size``): TRL's final
model through ``model.generate``, pr2's through the server (``Trainer.evaluate``), and the
start through ``model.generate``. The runs alternate (TRL, pr2 K=0, pr2 K=1, ... ``--repeats``
times) against one server that idles during the TRL runs; torch threads (``--threads``) are the
same for both trainers (the server is a subprocess with its own). ``--threads 1`` (the default,
what the Makefile's ``OMP_NUM_THREADS=1`` gives pr2's trainer runs) helps TRL too, measured here
(6 steps, 2 shared cores, load 4-5): 1.6 s per step with 1 thread, 37 s with 2 (OpenMP threads
contending for cores that other jobs hold). Writes ``benchmarks/results/vs_trl.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results
from benchmarks.staleness import demo_config

RUNS = ("trl", "pr2_sync", "pr2_async")


def pr2_rows(cfg, steps: int) -> tuple[list[dict], list]:
    """The prompts of pr2's rollout batches 1..``steps`` as TRL rows (``{"prompt", "answer"}``,
    in order), and pr2's held-out examples: read through pr2's own
    ``trainer.data.source.Source``."""
    from trainer.data.source import Source, load_tokenizer

    src = Source(cfg, load_tokenizer(cfg.model_dir), max_model_len=1 << 20)
    rows = [
        {"prompt": ex.prompt, **ex.columns}
        for step in range(1, steps + 1)
        for ex in src.batch(step).examples
    ]
    return rows, src.eval_batch().examples


def trl_config(cfg, out: str):
    """TRL's ``GRPOConfig`` matching the pr2 ``TrainConfig`` (the module docstring's table)."""
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


def run_trl(cfg, rows, eval_examples, out: str, last: int, log) -> dict:
    """TRL's GRPOTrainer on ``rows``; per-step end times and rollout rewards, final accuracy."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from trainer.data.rewards import toy

    rewards: list[float] = []
    ends: list[float] = []

    def toy_reward(prompts, completions, completion_ids, **columns):
        """pr2's own ``toy`` reward, recording each generated batch's mean."""
        values = toy(prompts, completions, completion_ids, **columns)
        rewards.append(statistics.mean(values))
        return values

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
        reward_funcs=toy_reward,
        args=trl_config(cfg, out),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # (its end-of-training dict of metrics)
    generate = trainer._generate_and_score_completions
    generate_s: list[float] = []

    def timed_generate(*a, **kw):  # generation + old log-probs + rewards + advantages
        t = time.perf_counter()
        batch = generate(*a, **kw)
        generate_s.append(time.perf_counter() - t)
        return batch

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    res = summary(ends, rewards, last)
    res["median_time_generate_and_score"] = statistics.median(generate_s)
    res["heldout_accuracy"] = greedy_accuracy(
        trainer.model.eval(), tokenizer, eval_examples, cfg.max_tokens
    )
    return res


def run_pr2(cfg, last: int, log) -> dict:
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

    with Trainer(cfg, log=lambda _: None) as trainer:
        rows = trainer.run(on_step)
        accuracy = trainer.evaluate()
    res = summary(ends, [m["reward_mean"] for m in rows], last)
    res["heldout_accuracy"] = accuracy
    median = lambda *keys: statistics.median(sum(m[k] for k in keys) for m in rows[1:])  # noqa: E731
    res["median_time_rollout_wait"] = median("time_rollout")
    res["median_time_old_pass_and_train"] = median("time_old_pass", "time_train")
    res["median_time_push"] = median("time_push")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--last", type=int, default=5, help="reward after N steps: the last this many")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both trainers")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {RUNS}")
    ap.add_argument("--out", default="benchmarks/results/vs_trl.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = measure(args, [r.strip() for r in args.runs.split(",")])
    results.update(
        seconds_total=time.perf_counter() - t_start,
        torch_threads=torch.get_num_threads(),
        omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"),
        cpus=os.cpu_count(),
        load_average_at_end=os.getloadavg(),
    )
    print_table(results)
    write_results(args.out, args, results)


def measure(args, which: list[str]) -> dict:
    from pr2_serve.server.launch import start_server

    key = secrets.token_hex(16)
    runs: dict[str, list[dict]] = {name: [] for name in which}
    load: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = demo_config("http://unused", key, args.model, Path(tmp), args.steps, 0)
        rows, eval_examples = pr2_rows(cfg0, args.steps)
        accuracy_start = None
        if "trl" in which:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(args.model)
            tok = AutoTokenizer.from_pretrained(args.model)
            accuracy_start = greedy_accuracy(model.eval(), tok, eval_examples, cfg0.max_tokens)
        srv = None
        if any(w.startswith("pr2") for w in which):
            print("starting pr2-serve ...", flush=True)
            srv = start_server(args.model, Path(tmp) / "state", api_key=key, timeout=900)
        try:
            for r in range(args.repeats):
                for name in which:
                    out = Path(tmp) / f"{name}-{r}"
                    print(f"{name} (run {r + 1}/{args.repeats})", flush=True)
                    if name == "trl":
                        res = run_trl(cfg0, rows, eval_examples, str(out), args.last, print)
                    else:
                        k = int(name == "pr2_async")
                        cfg = demo_config(srv.http, key, args.model, out, args.steps, k)
                        res = run_pr2(cfg, args.last, print)
                    runs[name].append(res)
                    load.append(os.getloadavg())
        finally:
            if srv is not None:
                srv.stop()
    return aggregate(runs, accuracy_start, load)


def aggregate(runs: dict[str, list[dict]], accuracy_start, load) -> dict:
    mean = lambda name, k: statistics.mean(x[k] for x in runs[name])  # noqa: E731
    table = {
        name: {
            "steps_per_s": mean(name, "steps_per_s"),
            "s_per_step": 1.0 / mean(name, "steps_per_s"),
            "reward_first": mean(name, "reward_first"),
            "reward_last": mean(name, "reward_last"),
            "heldout_accuracy": mean(name, "heldout_accuracy"),
        }
        for name in runs
    }
    ratios = {}
    if "trl" in table:
        for name in runs:
            if name != "trl":
                ratios[f"{name}_vs_trl"] = table[name]["steps_per_s"] / table["trl"]["steps_per_s"]
    return {
        "table": table,
        "ratio_steps_per_s": ratios,
        "heldout_accuracy_start": accuracy_start,
        "runs": runs,
        "load_average_after_each_run": load,
    }


def print_table(results: dict) -> None:
    print(
        f"{'run':<10} {'s/step':>7} {'steps/s':>8} {'reward first':>13} {'reward last':>12} "
        f"{'held-out acc':>13}"
    )
    for name, t in results["table"].items():
        print(
            f"{name:<10} {t['s_per_step']:>7.2f} {t['steps_per_s']:>8.3f} "
            f"{t['reward_first']:>13.3f} {t['reward_last']:>12.3f} "
            f"{t['heldout_accuracy']:>13.3f}"
        )
    print(f"held-out accuracy at the start: {results['heldout_accuracy_start']}")
    for k, v in results["ratio_steps_per_s"].items():
        print(f"steps/s {k}: x{v:.2f}")


if __name__ == "__main__":
    main()
