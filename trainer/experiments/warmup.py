"""Supervised warm-up on the synthetic tasks: a policy RL can improve (clearly above zero
accuracy, far from perfect).

Teacher-forced cross-entropy on ``answer + EOS`` after the prompt, Adam, batches sampled from
the task's train split; greedy eval on the held-out split every ``eval_every`` steps; stops once
eval accuracy reaches ``target_accuracy`` (None: never; exactly ``max_steps`` steps, which
makes the result independent of the eval's noise) and saves a HF checkpoint
(``save_pretrained``, byte tokenizer copied), without predictor tensors (PR2 starts at zero).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.algo.replay import MoEReplay
from trainer.data.tasks import EOS, Task, encode, exact_match


@dataclass
class WarmupResult:
    steps: int
    eval_accuracy: float
    history: list[tuple[int, float, float]]  # (step, loss, eval accuracy or nan)


def _batch(task: Task, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problems = task.batch(n, seed)
    seqs, masks = [], []
    for p in problems:
        prompt, answer = encode(p.prompt), [*encode(p.answer), EOS]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    t = max(len(s) for s in seqs)
    ids = torch.full((n, t), EOS, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


@torch.no_grad()
def greedy_accuracy(model, task: Task, n: int, seed: int, max_tokens: int) -> float:
    problems = task.batch(n, seed, split="eval")
    hits = 0.0
    for p in problems:
        ids = torch.tensor([encode(p.prompt)])
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=EOS
        )
        hits += exact_match(out[0, ids.shape[1] :].tolist(), p.answer)
    return hits / n


def warmup(
    model_dir: str | Path,
    out_dir: str | Path,
    task: Task,
    *,
    max_steps: int = 3000,
    batch_size: int = 64,
    lr: float = 3e-3,
    eval_every: int = 100,
    eval_size: int = 64,
    target_accuracy: float | None = 0.25,
    max_tokens: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> WarmupResult:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    MoEReplay(model)  # eager experts, natural routing (the predictor stays zero)
    opt = torch.optim.Adam(
        [p for n, p in model.named_parameters() if ".predictor." not in n], lr=lr
    )
    history: list[tuple[int, float, float]] = []
    acc = 0.0
    bar = tqdm(range(1, max_steps + 1), desc="warm-up", disable=not progress)
    step = 0
    for step in bar:
        model.train()
        x, y, mask = _batch(task, batch_size, seed * 1_000_003 + step)
        logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        evaluated = float("nan")
        if step % eval_every == 0:
            model.eval()
            acc = evaluated = greedy_accuracy(model, task, eval_size, seed, max_tokens)
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_acc=f"{acc:.2f}")
        history.append((step, loss.item(), evaluated))
        if target_accuracy is not None and acc >= target_accuracy:
            break
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if ".predictor." not in k}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(model_dir) / f
        if src.exists():
            shutil.copy(src, out / f)
    return WarmupResult(step, acc, history)
