"""What the loop asks for: a batch of prompts as token ids with their columns, and rewards for
completions.

:meth:`Source.local` runs before any server is asked anything: it loads the checkpoint's
tokenizer (``AutoTokenizer`` on ``model_dir``), reads its stop tokens (the tokenizer's EOS and
``generation_config.json``'s ``eos_token_id``), loads and checks every row of ``--dataset`` and
``--eval-dataset`` (:mod:`trainer.data.prompt_data`), encodes every prompt (text as is; chat
messages through
the checkpoint's chat template with the generation prompt), imports the reward functions
(:mod:`trainer.data.rewards`) and calls each once on a synthetic completion of the first prompt, in
the shape a rollout gives (TRL's signature). :meth:`Source.fit` then refuses a prompt longer
than the servers allow (``max_model_len`` of ``/v1/info`` minus ``max_tokens``). Bad data is a
:class:`~trainer.data.prompt_data.DatasetError` naming the file, row and field; a bad reward spec,
or a
reward function that raises, a :class:`~trainer.data.rewards.RewardError`.

- :meth:`Source.batch`: the prompts of a step -- a file's rows in a seeded order reshuffled each
  epoch (a pure function of the step, so a resumed run needs only its step); ``toy:<task>`` is a
  procedural stream, the same problems per step as the toy tasks always gave (and the byte
  tokenizer's ids are :func:`trainer.data.tasks.encode`'s), each batch checked before its rollout.
- :meth:`Source.eval_batch`: the held-out prompts (``--eval-dataset``, ``--eval-fraction`` of
  the rows, or the toy task's eval split), at most ``eval_size``.
- :meth:`Source.score`: completions decoded with the tokenizer (special tokens skipped; as chat
  messages for a conversational prompt, as TRL passes them) and scored by every reward function
  (weighted sum per sample, each function's mean for the logs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.data.prompt_data import (
    TOY_PREFIX,
    DatasetError,
    Example,
    batch_indices,
    check_lengths,
    encode_all,
    load_examples,
    prompt_ids,
    split_eval,
    toy_examples,
)
from trainer.data.rewards import Reward, load_rewards, score
from trainer.run.config import TrainConfig


@dataclass(frozen=True)
class _Synthetic:
    """A stand-in sample (what :meth:`Source.score` reads of one)."""

    output_token_ids: list[int]


@dataclass
class Prompts:
    """Examples and their prompt token ids (same order)."""

    examples: list[Example]
    ids: list[list[int]]


def stop_token_ids(tokenizer, model_dir: str | Path) -> list[int]:
    """The tokenizer's EOS, then ``generation_config.json``'s ``eos_token_id`` (int or list)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return list(dict.fromkeys(int(i) for i in ids))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise RuntimeError(f"{model_dir}: cannot load the checkpoint's tokenizer: {e}") from e


class Source:
    """Prompts and rewards of a run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, tokenizer, max_model_len: int | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.limit = None if max_model_len is None else max_model_len - cfg.max_tokens
        self.stop_token_ids = stop_token_ids(tokenizer, cfg.model_dir)
        self.rewards: list[Reward] = load_rewards(cfg.reward, cfg.reward_weights or None)
        self.toy = cfg.dataset.startswith(TOY_PREFIX)
        self.train: Prompts | None = None
        if self.toy:
            self.batch(1)  # the task name and a first batch, checked now
            ev = toy_examples(cfg.dataset, cfg.eval_size, cfg.seed, "eval", cfg.task_digits)
            self.eval = self._encode(ev, cfg.dataset + " (eval split)")
        else:
            train = load_examples(cfg.dataset, cfg.prompt_field)
            ev: list[Example] = []
            if cfg.eval_fraction:
                train, ev = split_eval(train, cfg.eval_fraction, cfg.seed)
            if not train:
                raise DatasetError(f"{cfg.dataset}: no rows to train on")
            self.train = self._encode(train, cfg.dataset)
            self.eval = self._encode(ev[: cfg.eval_size], cfg.dataset + " (eval split)")
        if cfg.eval_dataset:
            ev = load_examples(cfg.eval_dataset, cfg.prompt_field)[: cfg.eval_size]
            self.eval = self._encode(ev, cfg.eval_dataset)
        self._call_rewards_once()

    @classmethod
    def local(cls, cfg: TrainConfig) -> Source:
        """Everything checkable without a server (the prompt length limit waits for
        :meth:`fit`)."""
        return cls(cfg, load_tokenizer(cfg.model_dir))

    def fit(self, infos: Sequence[dict]) -> None:
        """Every server's ``/v1/info``: prompts longer than the smallest ``max_model_len``
        minus ``max_tokens`` are refused now, naming their row."""
        cfg = self.cfg
        self.limit = min(int(info["max_model_len"]) for info in infos) - cfg.max_tokens
        if self.toy:
            self.batch(1)
        else:
            check_lengths(self.train.examples, self.train.ids, cfg.dataset, self.limit)
        source = cfg.eval_dataset or f"{cfg.dataset} (eval split)"
        check_lengths(self.eval.examples, self.eval.ids, source, self.limit)

    def _call_rewards_once(self) -> None:
        """Each reward function called on one synthetic completion ("0") of the first prompt,
        as a rollout's would be passed: a function that cannot score fails now, not after the
        servers were waited for and the first rollouts made."""
        first = self.batch(1).examples[0]
        ids = self.tokenizer.encode("0", add_special_tokens=False)
        self.score([first], [[_Synthetic(ids)]])

    def _encode(self, examples: list[Example], source: str) -> Prompts:
        encode = lambda ex: prompt_ids(ex, self.tokenizer)  # noqa: E731
        return Prompts(examples, encode_all(examples, encode, source, self.limit))

    def batch(self, step: int) -> Prompts:
        """The ``prompts_per_batch`` prompts of rollout batch ``step`` (1-based)."""
        cfg = self.cfg
        if self.train is None:  # toy: the problems trainer.data.tasks gives this step
            seed = cfg.seed * 100003 + step
            ex = toy_examples(cfg.dataset, cfg.prompts_per_batch, seed, "train", cfg.task_digits)
            return self._encode(ex, cfg.dataset)
        rows = batch_indices(len(self.train.examples), cfg.prompts_per_batch, step, cfg.seed)
        return Prompts([self.train.examples[i] for i in rows], [self.train.ids[i] for i in rows])

    def eval_batch(self) -> Prompts:
        """The held-out prompts (empty when there is no eval split)."""
        return self.eval

    def score(
        self, examples: Sequence[Example], groups: Sequence[Sequence]
    ) -> tuple[list[float], dict[str, float | None]]:
        """Rewards of every sample (group-major) of ``groups``, one group per example, and each
        reward function's mean. A function that raises or returns the wrong number of values
        stops the run (:class:`~trainer.data.rewards.RewardError` naming it)."""
        pairs = [(ex, s) for ex, group in zip(examples, groups, strict=True) for s in group]
        if not pairs:
            return [], {r.name: None for r in self.rewards}
        ids = [list(s.output_token_ids) for _, s in pairs]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(ex.prompt, list) else t
            for (ex, _), t in zip(pairs, texts, strict=True)
        ]
        keys = dict.fromkeys(k for ex, _ in pairs for k in ex.columns)
        columns = {k: [ex.columns.get(k) for ex, _ in pairs] for k in keys}
        prompts = [ex.prompt for ex, _ in pairs]
        return score(self.rewards, prompts, completions, ids, columns)
