"""Tokenizers for the tiny local checkpoints (no hub here), saved in the checkpoint as HF files.

- ``byte``: token id == byte value, then ``<|endoftext|>`` (256), ``<|pad|>``, ``<|bos|>``: the
  toy tasks' and the demo's tokenizer.
- ``bpe``: a real byte-level BPE trained here with the ``tokenizers`` library on a fixed local
  corpus (English arithmetic word problems), with ChatML special tokens and a chat template in
  ``tokenizer_config.json``: what a Qwen-style checkpoint ships, so tests exercise subword
  tokenization and chat formatting end to end. Same corpus and size, same tokenizer.
"""

from __future__ import annotations

import random

BYTE_SPECIALS = {"<|endoftext|>": 256, "<|pad|>": 257, "<|bos|>": 258}
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZERS = ("byte", "bpe")


def make_tokenizer(kind: str, vocab_size: int):
    """The tiny checkpoint's tokenizer (a ``PreTrainedTokenizerFast``)."""
    if kind == "byte":
        return make_byte_tokenizer()
    if kind == "bpe":
        return make_bpe_tokenizer(vocab_size)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def make_byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: token id == byte value, plus the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()  # GPT-2's order: each byte's printable stand-in
    vocab = {chars[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab.update(BYTE_SPECIALS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        clean_up_tokenization_spaces=False,
    )


def make_bpe_tokenizer(vocab_size: int):
    """Byte-level BPE of ``vocab_size`` entries (specials included) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _corpus(n: int = 3000) -> list[str]:
    """Deterministic English arithmetic word problems and answers, as chat transcripts."""
    rng = random.Random(0)
    names = ["Ann", "Bob", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana"]
    things = ["apples", "books", "coins", "marbles", "pens", "stamps", "cards", "shells"]
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        who, what = rng.choice(names), rng.choice(things)
        q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
        lines.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>")
    return lines


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}
