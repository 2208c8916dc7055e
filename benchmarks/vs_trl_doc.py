"""The peer-comparison figures of ``docs/benchmarks.md`` (TRL vs pr2 sync / async), written from
the results file of ``benchmarks/vs_trl.py`` (``vs_trl.json``) between the page's
``<!-- vs_trl.py -->`` markers, each time the benchmark writes it: the page shows what the file
holds, and ``tests/test_docs.py`` checks that it still does.

    .venv/bin/python benchmarks/vs_trl_doc.py   # rewrite the block from the file as it is
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import doc_block
from trainer.run.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "vs_trl.json"
LOADED = ROOT / "benchmarks" / "results" / "vs_trl_loaded.json"  # an earlier run, kept
BEGIN, END = "<!-- vs_trl.py -->", "<!-- /vs_trl.py -->"
INDENT = "  "  # the block is part of the page's vs_trl.py list item
GOAL = 2  # pr2's steps/s over TRL's on the generation-heavy workload
NAMES = {"trl": "TRL", "pr2_sync": "pr2 sync", "pr2_async": "async"}


def render(run: dict) -> str:
    """The block's markdown (unindented) for the results file's contents ``run``."""
    res = run["results"]
    works = res["workloads"]
    lines = [
        _wrap(
            f"Latest run (`benchmarks/results/vs_trl.json`, {res['cpus']} shared cores, load "
            f"~{res['load_average_at_end'][0]:.1f} at the end, {res['seconds_total'] / 60:.0f} "
            "min), s/step and the phases' medians (written from the file by the script: "
            "`benchmarks/vs_trl_doc.py`):"
        ),
        "",
        "| workload | TRL | pr2 sync | pr2 async | sync ÷ TRL (per repeat) | "
        "async ÷ TRL (per repeat) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(name, w) for name, w in works.items()]
    lines += ["", _wrap(_rewards(works)), ""]
    if "gen" in works:
        lines.append(_wrap(_phases(works["gen"], res["cpus"])))
    return "\n".join(lines)


def _row(name: str, w: dict) -> str:
    t, ratio, per = w["table"], w["ratio_steps_per_s"], w["ratio_steps_per_s_per_repeat"]

    def cell(key: str) -> str:
        head = f"×{ratio[key]:.2f}"
        head = f"**{head}**" if name == "gen" else head
        return f"{head} ({', '.join(f'{x:.2f}' for x in per[key])})"

    steps = " | ".join(f"{t[r]['s_per_step']:.2f}" for r in NAMES)
    return f"| {name} | {steps} | {cell('pr2_sync_vs_trl')} | {cell('pr2_async_vs_trl')} |"


def _rewards(works: dict) -> str:
    def first_last(w: dict, sep: str) -> str:
        return sep.join(
            f"{t['reward_first']:.3f} → {t['reward_last']:.3f}" for t in w["table"].values()
        )

    gen, demo = works.get("gen"), works.get("demo")
    parts = []
    if gen:
        t = gen["table"]
        each = ", ".join(
            f"{NAMES[r]} {t[r]['reward_first']:.3f} → {t[r]['reward_last']:.3f}" for r in NAMES
        )
        parts.append(
            f"Reward on `gen`, first → last {gen['config']['last']} steps: {each} (equal within "
            "noise; each side's samples are seeded, so the repeats repeat the same rewards)"
        )
    if demo:
        text = f"on `demo` (first → last {demo['config']['last']}) {first_last(demo, ' / ')}"
        acc = [demo["table"][r]["heldout_accuracy"] for r in NAMES]
        if None not in acc and demo.get("heldout_accuracy_start") is not None:
            text += (
                f", held-out greedy accuracy {' / '.join(f'{a:.2f}' for a in acc)} from "
                f"{demo['heldout_accuracy_start']:.2f} ({TrainConfig.eval_size} problems)"
            )
        parts.append(text)
    return "; ".join(parts) + "."


def _phases(gen: dict, cpus: int) -> str:
    trl, sync, asy = (gen["table"][r] for r in NAMES)
    tm, sm, am = trl["median_time"], sync["median_time"], asy["median_time"]
    step, gen_s, train = trl["s_per_step"], tm["generate"], tm["train"]
    score = tm["generate_and_score"] - gen_s
    roll, opt, push = sm["rollout_wait"], sm["old_pass_and_train"], sm["push"]
    faster = gen_s / roll
    best = max(gen["ratio_steps_per_s"][k] for k in ("pr2_sync_vs_trl", "pr2_async_vs_trl"))
    met = best >= GOAL
    text = (
        f"The {GOAL}× goal is **met** (`gen`): "
        if met
        else f"The {GOAL}× goal is **not met on the CPU, and the phases say why** (`gen`): "
    )
    text += (
        f"TRL's step is HF generate {gen_s:.2f} s + old log-probs and scoring {score:.2f} s + 2 "
        f"updates {train:.2f} s; pr2 sync's is rollout {roll:.2f} s (vLLM: {faster:.1f}× faster "
        f"generation) + old pass and 2 updates {opt:.2f} s + push {push:.2f} s (the whole model, "
        f"every step). The training forward/backward is the same HF model{_experts(trl, sync)} on "
        f"the same tokens on both sides and is {(score + train) / step:.0%} of TRL's step: with "
        "free generation pr2 "
        f"sync would reach ×{step:.2f} / ({opt:.2f} + {push:.2f}) = ×{step / (opt + push):.2f} "
        f"at most (×{step / opt:.2f} with a free push as well). Async overlaps the rollout with "
        f"training (wait {am['rollout_wait']:.2f} s), but on {cpus} shared cores the overlapped "
        f"server slows the trainer (old pass + updates {am['old_pass_and_train']:.2f} s), so it "
        f"saves {sync['s_per_step'] - asy['s_per_step']:.2f} s of the {roll:.2f} s of generation "
        f"(×{gen['ratio_steps_per_s']['pr2_async_vs_pr2_sync']:.2f} over sync)."
    )
    if not met:
        text += (
            f" The {GOAL}× needs generation to dominate the step (on a GPU, where vLLM's lead "
            f"over HF `generate` is expected to be far larger than {faster:.1f}×: not measured "
            "here)."
        )
    if LOADED.exists():
        text += (
            " An earlier run under heavy load from other jobs, before the weight path streamed "
            f"uploads (`benchmarks/results/{LOADED.name}`), is kept for the record."
        )
    return text


def _experts(trl: dict, sync: dict) -> str:
    """Which MoE expert kernels each side trained with, as the file records it."""
    a, b = trl.get("experts_implementation"), sync.get("experts_implementation")
    if a is None or b is None:
        return ""
    return f" (transformers' `{a}` experts)" if a == b else f" (experts: TRL `{a}`, pr2 `{b}`)"


def _wrap(paragraph: str) -> str:
    return textwrap.fill(
        paragraph, 100 - len(INDENT), break_long_words=False, break_on_hyphens=False
    )


def block() -> str:
    """The block as the page holds it: markers included, indented into the list item."""
    text = f"{BEGIN}\n{render(json.loads(RESULTS.read_text()))}\n{END}"
    return "\n".join(INDENT + line if line else line for line in text.splitlines())


def rewrite() -> None:
    """Put :func:`block` between the page's markers."""
    doc_block.rewrite(PAGE, BEGIN, END, block(), "vs_trl")


if __name__ == "__main__":
    rewrite()
