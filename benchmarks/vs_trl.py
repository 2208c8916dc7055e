"""Peer comparison: TRL's ``GRPOTrainer`` (its own generation, ``model.generate`` on the CPU, no
vLLM) vs ``pr2-train`` synchronous (``--max-staleness 0``) and asynchronous (``1``) against one
real ``pr2-serve`` (fp32, CPU), on two workloads, in one run: seconds per rollout step (and its
phases) and reward after N steps for each, and pr2 steps/s / TRL steps/s.

    PYTHONPATH=$PWD python -m benchmarks.vs_trl --model runs/demo/model
    PYTHONPATH=$PWD python -m benchmarks.vs_trl --smoke --out /tmp/vs_trl.json  # seconds-long

Workloads (``--workloads``, default both):

- ``demo``: the demo config (``benchmarks.staleness.demo_config``: the warmed-up tiny Qwen3-MoE,
  hidden 64, ``toy:addition`` 2 digits, 32 prompts x 8 samples of at most 6 tokens, the ``toy``
  reward, pr2 replay with predictor lr x10, no periodic eval). A step is fixed costs.
- ``gen`` (generation-heavy): the bench model (``benchmarks.common.BENCH_SPEC``: hidden 512, 16
  experts, top-2, 4 layers, 214 MB fp32; random weights made here, seed 0, zero predictor), the
  same ``toy:addition`` prompts, 8 prompts x 4 samples of 128 tokens, reward :func:`digit_share`
  (digit tokens / 128: the random model stops at EOS rarely, so nearly every completion is 128
  tokens, and the reward is dense enough for GRPO to move it -- the ``toy`` exact match is 0 on
  a random model). Everything else as ``demo``.

TRL gets the same config, field by field (:func:`trl_config`):

    pr2-train                          TRL GRPOConfig
    prompts_per_batch P x              generation_batch_size P*S = per_device_train_batch_size
      samples_per_prompt S               P*S/2 x steps_per_generation 2; num_generations S
    off_policy_steps 2 (the batch      steps_per_generation 2 (the generated batch is split into
      split into 2 mini-steps, one       2 optimizer steps; old log-probs from one pass at
      Adam update each, old pass)        generation time), num_iterations 1, grad accumulation 1
    steps N (rollout batches)          max_steps 2N (optimizer steps)
    max_tokens T, temperature 1        max_completion_length T, temperature 1, top_p 1, top_k 0
    lr 2e-4, Adam (0.9, 0.999, 1e-8)   learning_rate 2e-4, constant schedule, no warm-up, AdamW
      no weight decay                    weight_decay 0 (= Adam), same betas and eps
    grad_clip 1.0, clip_eps 0.2        max_grad_norm 1.0, epsilon 0.2
    no KL term                         beta 0 (no reference model)
    loss: token sum / the mini-step's  loss_type "bnpo" (token sum / the local batch's token
      token count                        count: with one process and no accumulation, the same)
      (trainer/algo/ppo.py)
    GRPO advantages (r - mean) / std   scale_rewards "group": (r - mean) / (std + 1e-4), std
      (std unbiased=False, + 1e-6)       unbiased (a slightly smaller advantage scale)
    load_balance_coef 0                router_aux_loss_coef 0 (TRL turns the config's 0.001 on)
    reward (cfg.reward, loaded by      reward_funcs: the same function (TRL's signature)
      trainer.data.rewards.load_reward)
    prompts of step s (Source.batch)   the same rows, in order (shuffle_dataset False)

Not matched: pr2 replays the served routes (``--replay pr2``, as in the demo) and trains the
evolution predictor (lr x10); TRL has no routing replay (its training forward routes itself).
TRL shuffles the samples of a generated batch before splitting it into its 2 optimizer steps;
pr2 splits by prompt groups. Sampling seeds differ (vLLM vs torch), so the samples differ.

A step is one rollout batch (generation of P*S samples + its 2 updates; pr2 also pushes the
weights to the server). Steps/s counts the steps after the first, from the wall time between
the ends of steps (the first includes warm-up; asynchronous pr2's first step is synchronous).
Phases (medians over the steps after the first): TRL's ``generate`` (its ``_generate``: HF
``model.generate``), ``generate_and_score`` (+ old log-probs, rewards, advantages) and ``train``
(the rest of the step: 2 forward/backward passes and Adam updates); pr2's ``rollout_wait`` (the
trainer blocked on the rollout), ``generate_request`` (the HTTP generate request, routes
included; overlapped with training when asynchronous), ``old_pass_and_train`` and ``push``.
Reward after N steps: the mean rollout reward of the last ``--last`` steps (same function, same
prompts on both sides). Held-out accuracy (``demo`` only): greedy, the toy eval split
(``eval_size``): TRL's final model through ``model.generate``, pr2's through the server
(``Trainer.evaluate``), and the start through ``model.generate``. The runs alternate (TRL, pr2
K=0, pr2 K=1, ... ``--repeats`` times) against one server per workload that idles during the TRL
runs; the ratios are also given per repeat (the runs of one repeat are minutes apart: the
machine's load moves less between them). Torch threads (``--threads``) are the same for both
trainers (the server is a subprocess with its own). ``--threads 1`` (the default, what the
Makefile's ``OMP_NUM_THREADS=1`` gives pr2's trainer runs) helps TRL too, measured here (6
steps, 2 shared cores, load 4-5): 1.6 s per step with 1 thread, 37 s with 2 (OpenMP threads
contending for cores that other jobs hold). Writes ``benchmarks/results/vs_trl.json``, and
the figures of ``docs/benchmarks.md`` from it (``benchmarks/vs_trl_doc.py``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import vs_trl_doc
from benchmarks.common import BENCH_SPEC, write_results
from benchmarks.staleness import demo_config
from benchmarks.vs_trl_runs import greedy_accuracy, run_pr2, run_trl

RUNS = ("trl", "pr2_sync", "pr2_async")
WORKLOADS = ("demo", "gen")
GEN_TOKENS = 128
#: the generation-heavy workload's changes to the demo config
GEN = {
    "max_tokens": GEN_TOKENS,
    "prompts_per_batch": 8,
    "samples_per_prompt": 4,
    "reward": ["benchmarks.vs_trl:digit_share"],
}
#: ``--smoke``: a tiny model, 2 prompts x 2 samples of at most 8 tokens, 2 steps, 1 repeat
SMOKE = {"prompts_per_batch": 2, "samples_per_prompt": 2, "eval_size": 4}
DIGITS = range(ord("0"), ord("9") + 1)  # the byte tokenizer: token id == byte
COMPLETION_LENGTHS: list[int] = []  # digit_share's record: every scored completion's length


def digit_share(prompts, completions, completion_ids, **_) -> list[float]:
    """The generation-heavy workload's reward: digit tokens per ``GEN_TOKENS`` completion tokens
    (TRL's reward signature; the same function on both sides)."""
    COMPLETION_LENGTHS.extend(len(ids) for ids in completion_ids)
    return [sum(t in DIGITS for t in ids) / GEN_TOKENS for ids in completion_ids]


def workload_config(
    workload: str, server: str, key, model, out, steps: int, staleness: int, smoke: bool = False
):
    """pr2's ``TrainConfig`` of ``workload`` (the demo config, plus :data:`GEN` for ``gen``)."""
    cfg = demo_config(server, key, str(model), Path(out), steps, staleness)
    if workload == "gen":
        cfg = replace(cfg, **GEN)
    if smoke:
        cfg = replace(cfg, **SMOKE, max_tokens=min(cfg.max_tokens, 8))
    return cfg


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/model", help="the demo workload's model")
    ap.add_argument(
        "--bench-model", help="the gen workload's model (default: BENCH_SPEC, made here)"
    )
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"a subset of {WORKLOADS}")
    ap.add_argument("--steps", type=int, default=20, help="steps of the demo workload")
    ap.add_argument("--gen-steps", type=int, default=8, help="steps of the gen workload")
    ap.add_argument("--last", type=int, default=5, help="reward after N steps: the last this many")
    ap.add_argument("--gen-last", type=int, default=3, help="--last of the gen workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both trainers")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {RUNS}")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model for every workload, 2 prompts x 2 samples, 2 steps, 1 repeat",
    )
    ap.add_argument("--out", default="benchmarks/results/vs_trl.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = args.gen_steps = 2
        args.last = args.gen_last = args.repeats = 1
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    which = [r.strip() for r in args.runs.split(",")]
    results: dict = {"workloads": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workload in [w.strip() for w in args.workloads.split(",")]:
                model = workload_model(workload, args, Path(tmp))
                print(f"== workload {workload}: {model}", flush=True)
                res = measure(args, workload, model, which, Path(tmp) / workload)
                results["workloads"][workload] = res
                print_table(workload, res)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)  # (a caller in the same process keeps its own)
    results.update(
        seconds_total=time.perf_counter() - t_start,
        torch_threads=used,
        omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"),
        cpus=os.cpu_count(),
        load_average_at_end=os.getloadavg(),
    )
    for workload, res in results["workloads"].items():
        print_table(workload, res)
    write_results(args.out, args, results)
    if not args.smoke and Path(args.out).resolve() == vs_trl_doc.RESULTS:
        vs_trl_doc.rewrite()  # the docs page's figures are this file's


def workload_model(workload: str, args, tmp: Path) -> str:
    """The model directory of ``workload`` (``--smoke``: a tiny random one for every workload)."""
    from pr2_serve.tiny.tiny_model import make_tiny_model

    if args.smoke:
        return str(make_tiny_model(tmp / f"{workload}-tiny", seed=0))
    if workload == "demo":
        return args.model
    if args.bench_model:
        return args.bench_model
    return str(make_tiny_model(tmp / "bench", seed=0, spec=BENCH_SPEC))


def measure(args, workload: str, model: str, which: list[str], tmp: Path) -> dict:
    from pr2_serve.server.launch import start_server

    gen = workload == "gen"
    steps, last = (args.gen_steps, args.gen_last) if gen else (args.steps, args.last)
    key = secrets.token_hex(16)
    runs: dict[str, list[dict]] = {name: [] for name in which}
    load: list[tuple] = []
    config = lambda server, out, k: workload_config(  # noqa: E731
        workload, server, key, model, out, steps, k, args.smoke
    )
    cfg0 = config("http://unused", tmp / "cfg0", 0)
    rows, eval_examples = pr2_rows(cfg0, steps)
    heldout = not gen  # (the toy exact match of a random model's 128 tokens: 0)
    accuracy_start = None
    if "trl" in which and heldout:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(model)
        tok = AutoTokenizer.from_pretrained(model)
        accuracy_start = greedy_accuracy(m.eval(), tok, eval_examples, cfg0.max_tokens)
    srv = None
    if any(w.startswith("pr2") for w in which):
        print("starting pr2-serve ...", flush=True)
        srv = start_server(model, tmp / "state", api_key=key, timeout=900)
    try:
        for r in range(args.repeats):
            for name in which:
                out = tmp / f"{name}-{r}"
                print(f"{workload}: {name} (run {r + 1}/{args.repeats})", flush=True)
                if name == "trl":
                    examples = eval_examples if heldout else None
                    res = run_trl(cfg0, rows, examples, str(out), last, print)
                else:
                    cfg = config(srv.http, out, int(name == "pr2_async"))
                    res = run_pr2(cfg, last, print, heldout)
                runs[name].append(res)
                load.append(os.getloadavg())
    finally:
        if srv is not None:
            srv.stop()
    res = aggregate(runs, accuracy_start, load)
    res["config"] = {
        "model": model,
        "prompts_per_batch": cfg0.prompts_per_batch,
        "samples_per_prompt": cfg0.samples_per_prompt,
        "max_tokens": cfg0.max_tokens,
        "reward": cfg0.reward,
        "steps": steps,
        "last": last,
    }
    return res


PHASES = {
    "trl": ("generate", "generate_and_score", "train"),
    "pr2": ("rollout_wait", "generate_request", "old_pass_and_train", "push"),
}


def aggregate(runs: dict[str, list[dict]], accuracy_start, load) -> dict:
    mean = lambda name, k: statistics.mean(x[k] for x in runs[name])  # noqa: E731

    def maybe(name, k):
        values = [x[k] for x in runs[name] if x.get(k) is not None]
        return statistics.mean(values) if values else None

    table = {}
    for name in runs:
        table[name] = {
            "steps_per_s": mean(name, "steps_per_s"),
            "s_per_step": 1.0 / mean(name, "steps_per_s"),
            "reward_first": mean(name, "reward_first"),
            "reward_last": mean(name, "reward_last"),
            "heldout_accuracy": maybe(name, "heldout_accuracy"),
            "mean_completion_tokens": maybe(name, "mean_completion_tokens"),
            # transformers' MoE expert kernels the side trained with
            "experts_implementation": runs[name][0].get("experts_implementation"),
            "median_time": {
                phase: mean(name, f"median_time_{phase}") for phase in PHASES[name[:3]]
            },
        }
    ratios, per_repeat = {}, {}
    if "trl" in table:
        for name in runs:
            if name != "trl":
                ratios[f"{name}_vs_trl"] = table[name]["steps_per_s"] / table["trl"]["steps_per_s"]
                per_repeat[f"{name}_vs_trl"] = [
                    x["steps_per_s"] / t["steps_per_s"]
                    for x, t in zip(runs[name], runs["trl"], strict=True)
                ]
    if {"pr2_sync", "pr2_async"} <= set(table):
        ratios["pr2_async_vs_pr2_sync"] = (
            table["pr2_async"]["steps_per_s"] / table["pr2_sync"]["steps_per_s"]
        )
    return {
        "table": table,
        "ratio_steps_per_s": ratios,
        "ratio_steps_per_s_per_repeat": per_repeat,
        "heldout_accuracy_start": accuracy_start,
        "runs": runs,
        "load_average_after_each_run": load,
    }


def print_table(workload: str, results: dict) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"== workload {workload}: {results['config']}")
    print(
        f"{'run':<10} {'s/step':>7} {'steps/s':>8} {'reward first':>13} {'reward last':>12} "
        f"{'held-out acc':>13} {'tokens':>7}  phases (median s)"
    )
    for name, t in results["table"].items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in t["median_time"].items())
        print(
            f"{name:<10} {t['s_per_step']:>7.2f} {t['steps_per_s']:>8.3f} "
            f"{t['reward_first']:>13.3f} {t['reward_last']:>12.3f} "
            f"{fmt(t['heldout_accuracy'], '.3f'):>13} "
            f"{fmt(t['mean_completion_tokens'], '.1f'):>7}  {phases}"
        )
    print(f"held-out accuracy at the start: {results['heldout_accuracy_start']}")
    for k, v in results["ratio_steps_per_s"].items():
        each = results["ratio_steps_per_s_per_repeat"].get(k)
        per = f" (per repeat {', '.join(f'x{x:.2f}' for x in each)})" if each else ""
        print(f"steps/s {k}: x{v:.2f}{per}")


if __name__ == "__main__":
    main()
