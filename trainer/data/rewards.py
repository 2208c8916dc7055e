"""Reward functions with TRL's signature, so users bring the ones they have:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

``prompts``/``completions`` are text (or chat messages for a conversational prompt),
``completion_ids`` the generated token ids, and every other dataset column is passed by name
with one value per sample. ``None`` means "does not apply" (skipped in the weighted sum, as TRL
does). ``--reward`` takes a built-in name or ``module:function`` (importable, e.g. from
``PYTHONPATH``), repeatable, with ``--reward-weights``. A function that raises or returns the
wrong number of values stops the run with its name (never silent zero rewards).

Built-ins: ``exact`` (the ``answer`` column equals the completion text, stripped), ``math``
(``math-verify``: parse the ``answer`` column and the completion, verify), ``format:REGEX``
(1.0 when the completion matches the regex, else 0.0), ``toy`` (the toy tasks' exact match on
the ids: the answer then EOS 256, the byte tokenizer's; the default of ``toy:<task>`` data).
"""

from __future__ import annotations

import importlib
import math
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function failed; the message names it."""


def user_traceback(error: RewardError) -> str | None:
    """The traceback of what a reward function raised, in the user's own frames (the trainer's
    are left out), as Python prints one; None when no frame of it is the user's (a built-in)."""
    cause = error.__cause__
    if cause is None or cause.__traceback__ is None:
        return None
    ours = Path(__file__).resolve().parents[1]  # the trainer package
    frames = [
        f
        for f in traceback.extract_tb(cause.__traceback__)
        if not Path(f.filename).resolve().is_relative_to(ours)
    ]
    if not frames:
        return None
    return (
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_list(frames))
        + "".join(traceback.format_exception_only(cause))
    )


def _text(c) -> str:
    return c if isinstance(c, str) else str(c[-1]["content"]) if c else ""


def exact(prompts, completions, completion_ids, answer=None, **_) -> list[float | None]:
    if answer is None:
        raise ValueError("exact needs an 'answer' column")
    return [
        float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)
    ]


def math_reward(prompts, completions, completion_ids, answer=None, **_) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to the ``answer`` column."""
    from math_verify import parse, verify

    if answer is None:
        raise ValueError("math needs an 'answer' column")
    out: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        gold = parse(str(a))
        out.append(float(bool(gold) and verify(gold, parse(_text(c)))))
    return out


def toy(prompts, completions, completion_ids, answer=None, **_) -> list[float | None]:
    """The toy tasks' reward (:func:`trainer.data.tasks.exact_match` on the ids): the answer, then
    the byte tokenizer's EOS -- a cut-off or padded answer scores 0, as the demo always had."""
    from trainer.data.tasks import exact_match

    if answer is None:
        raise ValueError("toy needs an 'answer' column")
    return [exact_match(ids, str(a)) for ids, a in zip(completion_ids, answer, strict=True)]


def format_reward(pattern: str) -> RewardFn:
    regex = re.compile(pattern, re.DOTALL)

    def fmt(prompts, completions, completion_ids, **_) -> list[float | None]:
        return [float(regex.search(_text(c)) is not None) for c in completions]

    fmt.__name__ = f"format:{pattern}"
    return fmt


BUILTINS: dict[str, RewardFn] = {"exact": exact, "math": math_reward, "toy": toy}


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def load_reward(spec: str, weight: float = 1.0) -> Reward:
    """A reward from its ``--reward`` spec: a built-in, ``format:REGEX`` or ``module:function``."""
    if spec in BUILTINS:
        return Reward(spec, BUILTINS[spec], weight)
    if spec.startswith("format:"):
        return Reward(spec, format_reward(spec.removeprefix("format:")), weight)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise RewardError(
            f"reward {spec!r}: use a built-in ({', '.join(BUILTINS)}, format:REGEX) "
            "or module:function"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {spec!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return Reward(spec, fn, weight)


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None = None) -> list[Reward]:
    if weights and len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} reward functions")
    return [load_reward(s, w) for s, w in zip(specs, weights or [1.0] * len(specs), strict=True)]


def score(
    rewards: Sequence[Reward], prompts, completions, completion_ids, columns: dict[str, list]
) -> tuple[list[float], dict[str, float | None]]:
    """Weighted sum per sample (``None`` skipped) and each function's mean (for the logs)."""
    n = len(completions)
    totals = [0.0] * n
    means: dict[str, float | None] = {}
    for r in rewards:
        values = _call(r, prompts, completions, completion_ids, columns, n)
        seen = [v for v in values if v is not None]
        means[r.name] = sum(seen) / len(seen) if seen else None
        for i, v in enumerate(values):
            if v is not None:
                totals[i] += r.weight * v
    return totals, means


def _call(r: Reward, prompts, completions, completion_ids, columns, n: int) -> list:
    try:
        values = list(r.fn(prompts, completions, completion_ids, **columns))
    except Exception as e:
        raise RewardError(f"reward function {r.name!r} raised {type(e).__name__}: {e}") from e
    if len(values) != n:
        raise RewardError(f"reward function {r.name!r} returned {len(values)} values for {n}")
    for v in values:
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise RewardError(f"reward function {r.name!r} returned {v!r} (not a finite number)")
    return values
