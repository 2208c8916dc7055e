"""Prompt datasets in the ecosystem's formats, checked before any rollout.

``--dataset PATH`` takes JSONL, JSON or Parquet, loaded with Hugging Face ``datasets`` from the
local file (no hub access is attempted), in TRL's two prompt formats:

- standard: ``{"prompt": "What is 2 + 3?", "answer": "5"}``
- conversational: ``{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}``

Every other column travels with the example to the reward functions (as in TRL).
``toy:addition`` (``toy:sort``, ``toy:count``) writes the built-in toy tasks through the same
path. Bad data -- a missing file, an unknown format, a missing field, an empty prompt, a prompt
longer than the server allows -- raises :class:`DatasetError` naming the file, row and field.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOY_PREFIX = "toy:"


class DatasetError(ValueError):
    """Bad training data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Example:
    """One prompt (text, or chat messages) and the row's other columns."""

    prompt: str | list[dict]
    columns: dict[str, Any] = field(default_factory=dict)
    row: int = 0


def load_examples(source: str, prompt_field: str = "prompt", toy_size: int = 512) -> list[Example]:
    """The examples of ``source`` (a file path or ``toy:<task>``), every row checked."""
    if source.startswith(TOY_PREFIX):
        rows = toy_rows(source.removeprefix(TOY_PREFIX), toy_size)
    else:
        rows = _read_rows(Path(source))
    return [_example(source, i, row, prompt_field) for i, row in enumerate(rows)]


def toy_rows(task: str, n: int, seed: int = 0, split: str = "train", digits: int = 2) -> list[dict]:
    """Rows ``{"prompt", "answer"}`` of a built-in toy task or a comma-separated mix (see
    :mod:`trainer.data.tasks`): ``Task(task, digits).batch(n, seed, split)``."""
    from trainer.data.tasks import TASKS, Task

    unknown = [t for t in task.split(",") if t.strip() not in TASKS]
    if unknown:
        raise DatasetError(f"{TOY_PREFIX}{task}: unknown toy task; choose from {sorted(TASKS)}")
    problems = Task(task, digits).batch(n, seed, split)
    return [{"prompt": p.prompt, "answer": p.answer} for p in problems]


def toy_examples(
    source: str, n: int, seed: int, split: str = "train", digits: int = 2
) -> list[Example]:
    """``n`` checked examples of ``toy:<task>``: a procedural stream, a fresh batch per seed."""
    rows = toy_rows(source.removeprefix(TOY_PREFIX), n, seed, split, digits)
    return [_example(source, i, row, "prompt") for i, row in enumerate(rows)]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unknown format {path.suffix!r}; use one of {sorted(FORMATS)}")
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON, not Parquet...
        raise DatasetError(f"{path}: cannot read as {kind}: {e}") from e
    return list(ds)


def _example(source: str, i: int, row: dict, prompt_field: str) -> Example:
    where = f"{source}: row {i}"
    if prompt_field not in row or row[prompt_field] is None:
        raise DatasetError(f"{where}: missing field {prompt_field!r} (columns: {sorted(row)})")
    prompt = row[prompt_field]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError(f"{where}: field {prompt_field!r} is an empty prompt")
    elif isinstance(prompt, list):
        _check_messages(where, prompt_field, prompt)
    else:
        raise DatasetError(
            f"{where}: field {prompt_field!r} must be text or a list of chat messages, "
            f"got {type(prompt).__name__}"
        )
    columns = {k: v for k, v in row.items() if k != prompt_field}
    return Example(prompt, columns, i)


def _check_messages(where: str, field_name: str, messages: list) -> None:
    if not messages:
        raise DatasetError(f"{where}: field {field_name!r} is an empty conversation")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(f"{where}: {field_name}[{j}] must be {{'role', 'content'}}")
    if not any(str(m["content"]).strip() for m in messages):
        raise DatasetError(f"{where}: field {field_name!r} has only empty messages")


def prompt_ids(example: Example, tokenizer) -> list[int]:
    """Token ids of a prompt: text as is (no special tokens added), messages through the
    checkpoint's chat template with the generation prompt (what vLLM's chat route does)."""
    if isinstance(example.prompt, str):
        return tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    out = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_all(
    examples: Sequence[Example],
    tokenize: Callable[[Example], list[int]],
    source: str,
    limit: int | None,
) -> list[list[int]]:
    """Every prompt's ids, checked by :func:`check_lengths` (``limit`` None: not yet known)."""
    out = [tokenize(ex) for ex in examples]
    check_lengths(examples, out, source, limit)
    return out


def check_lengths(
    examples: Sequence[Example], ids: Sequence[list[int]], source: str, limit: int | None
) -> None:
    """A prompt with more than ``limit`` tokens is a :class:`DatasetError` naming its row."""
    if limit is None:
        return
    for ex, prompt in zip(examples, ids, strict=True):
        if len(prompt) > limit:
            raise DatasetError(
                f"{source}: row {ex.row}: prompt of {len(prompt)} tokens exceeds the limit "
                f"{limit} (the server's max_model_len minus max_tokens)"
            )


def split_eval(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded train/eval split (``fraction`` of the rows to eval)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(fraction * len(examples))
    eval_idx = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    return train, [examples[i] for i in sorted(eval_idx)]


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Rows of batch ``step`` (1-based): epochs of a permutation reshuffled with the seed."""
    start = (step - 1) * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + batch - len(out)])
    return out
