"""Synthetic, verifiable tasks a tiny byte-level model can learn; exact-match reward.

Problems are generated procedurally from a seed. Train and eval splits are disjoint by
construction: a problem belongs to the eval split iff a hash of its prompt falls in the eval
bucket (1 in 8), whatever seed produced it.

Prompts and answers are ASCII; token ids are the bytes (the tiny model's byte tokenizer), and
an answer is complete when the model emits EOS (id 256) after it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["EOS", "TASKS", "Problem", "Task", "decode", "encode", "exact_match", "make_task"]

EOS = 256


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str
    answer: str


def encode(text: str) -> list[int]:
    return list(text.encode())


def decode(token_ids: Sequence[int]) -> tuple[str, bool]:
    """Bytes before the first EOS as text, and whether EOS was produced."""
    out = bytearray()
    for t in token_ids:
        if t == EOS:
            return out.decode("utf-8", "replace"), True
        if t < 256:
            out.append(t)
    return out.decode("utf-8", "replace"), False


def exact_match(output_ids: Sequence[int], answer: str) -> float:
    """1.0 iff the output is exactly ``answer`` followed by EOS."""
    text, ended = decode(output_ids)
    return float(ended and text == answer)


def _addition(rng: random.Random, digits: int) -> Problem:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return Problem(f"{a}+{b}=", str(a + b))


def _sort(rng: random.Random, digits: int) -> Problem:
    s = "".join(rng.choice("0123456789") for _ in range(digits + 2))
    return Problem(f"sort {s}:", "".join(sorted(s)))


def _count(rng: random.Random, digits: int) -> Problem:
    n = digits + 4
    s = "".join(rng.choice("ab") for _ in range(n))
    return Problem(f"count a {s}:", str(s.count("a")))


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "addition": _addition,
    "sort": _sort,
    "count": _count,
}


@dataclass
class Task:
    """A task family at a difficulty (``digits``) with disjoint train/eval splits."""

    name: str = "addition"
    digits: int = 2
    eval_bucket: int = 8

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.name.split(",")]
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        self._makers = [TASKS[n] for n in names]

    def is_eval(self, p: Problem) -> bool:
        h = int.from_bytes(hashlib.blake2b(p.prompt.encode(), digest_size=4).digest(), "little")
        return h % self.eval_bucket == 0

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        want_eval = split == "eval"
        while True:
            p = rng.choice(self._makers)(rng, self.digits)
            if self.is_eval(p) == want_eval:
                return p

    def batch(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        rng = random.Random(f"{self.name}/{self.digits}/{split}/{seed}")
        return [self.sample(rng, split) for _ in range(n)]


def make_task(name: str = "addition", digits: int = 2) -> Task:
    return Task(name, digits)
