from __future__ import annotations

import json

from safetensors.torch import load_file

from pr2_serve.core.served_checkpoint import WeightTable
from pr2_serve.tiny.tiny_model import make_byte_tokenizer, make_tiny_model


def test_deterministic_for_a_seed(tmp_path):
    a = load_file(
        str(make_tiny_model(tmp_path / "a", seed=4, predictor="random") / "model.safetensors")
    )
    b = load_file(
        str(make_tiny_model(tmp_path / "b", seed=4, predictor="random") / "model.safetensors")
    )
    c = load_file(
        str(make_tiny_model(tmp_path / "c", seed=5, predictor="random") / "model.safetensors")
    )
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_shape_meets_vllm_cpu_constraints_and_predictors(tmp_path):
    d = make_tiny_model(tmp_path, predictor="random")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["head_dim"] == 32 and cfg["hidden_size"] % 32 == 0
    assert cfg["num_hidden_layers"] >= 4 and cfg["num_experts_per_tok"] == 2
    table = WeightTable.from_checkpoint(d)
    assert len(table.predictor_names()) == 4
    t = load_file(str(d / "model.safetensors"))
    assert t["model.layers.3.mlp.predictor.weight"].shape == (8, 64)


def test_byte_tokenizer_roundtrip():
    tok = make_byte_tokenizer()
    ids = tok("héllo\n", add_special_tokens=False)["input_ids"]
    assert ids == list("héllo\n".encode())
    assert tok.decode(ids) == "héllo\n"
    assert tok.eos_token_id == 256


def test_bpe_tokenizer_is_subword_with_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    d = make_tiny_model(tmp_path, tokenizer="bpe")
    tok = AutoTokenizer.from_pretrained(d)
    text = "Ann has 12 apples and gets 30 more. How many apples does Ann have now?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode()) // 2  # real merges, not bytes
    assert max(ids) < json.loads((d / "config.json").read_text())["vocab_size"]
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    assert chat == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    ]
    again = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "b", tokenizer="bpe"))
    assert again(text)["input_ids"] == tok(text)["input_ids"]  # same corpus, same tokenizer


def test_every_file_is_readable_as_the_umask_allows(tmp_path):
    """``model.safetensors`` included (transformers writes it through a 0600 temporary file):
    a shared model store is readable by its other users."""
    import os

    umask = os.umask(0o022)
    try:
        model = make_tiny_model(tmp_path / "m", seed=0, predictor="random")
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in model.iterdir() if f.is_file()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes
