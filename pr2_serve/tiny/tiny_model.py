"""Tiny MoE checkpoints made locally (no model hub here): config, safetensors, tokenizer.

``pr2-tiny-model DIR [--seed N] [--predictor zero|random] [--arch/--family qwen3_moe|...]
[--tokenizer byte|bpe]`` writes a real
Hugging Face checkpoint that both transformers and vLLM's CPU build load: head_dim 32 (a size the
CPU attention supports), hidden a multiple of 32 (the CPU MoE kernel's need), fp32 weights. The
same seed gives the same bytes.

Predictor weights, when asked for, are stored beside the routers under
``model.layers.{i}.mlp.predictor.weight`` (``[num_experts, hidden]``), the name the PR2 plugin and
the trainer read (stock vLLM refuses unknown tensors: serve those with the plugin).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pr2_serve.core.served_checkpoint import moe_layer_indices, predictor_name
from pr2_serve.tiny.tiny_tokenizers import TOKENIZERS, make_byte_tokenizer, make_tokenizer

__all__ = ["ARCHS", "TinySpec", "make_byte_tokenizer", "make_tiny_model", "predictor_name"]
__all__ += ["TOKENIZERS"]

ARCHS = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "glm4_moe",
    "deepseek_v3",
    "deepseek_v2",
    "gpt_oss",
)
# families whose router is group-limited top-k: on sigmoid scores with a correction bias
# (noaux_tc: GLM-4.5, DeepSeek-V3), on softmax scores (group_limited_greedy: DeepSeek-V2)
GROUPED_ARCHS = ("glm4_moe", "deepseek_v3", "deepseek_v2")
# experts and top-k when not given: the new families get enough experts for 4 groups of 4
_DEFAULT_EXPERTS = {a: (16, 4) for a in (*GROUPED_ARCHS, "gpt_oss")}


@dataclass(slots=True)
class TinySpec:
    """Sizes of a tiny model. Defaults: 4 MoE layers, 8 experts, top-2, hidden 64, vocab 512;
    GLM-4.5 / DeepSeek-V3 / DeepSeek-V2 / GPT-OSS: 16 experts, top-4, and for the grouped three
    4 groups of which 2 are kept, 1 shared expert, the first layer dense (so MoE ordinals differ
    from layer indices, as in the real models), and for GLM-4.5 / DeepSeek-V3 a non-zero
    correction bias."""

    arch: str = "qwen3_moe"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    num_experts: int = 0  # 0: the family's default (8, or 16 for the families above)
    top_k: int = 0  # 0: 2, or 4
    moe_intermediate_size: int = 64
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    # Router weights are drawn with this std (HF's 0.02 makes every router nearly uniform, so the
    # routes of a random model would hinge on float noise rather than on the input).
    router_std: float = 0.25
    # grouped routers (GROUPED_ARCHS) only
    num_groups: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    first_dense_layers: int = 1
    # std of the correction bias (noaux_tc) and of GPT-OSS's router bias: large enough to move
    # some selections (sigmoid scores here spread over ~0.1-0.9)
    router_bias_std: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        experts, top_k = _DEFAULT_EXPERTS.get(self.arch, (8, 2))
        self.num_experts = self.num_experts or experts
        self.top_k = self.top_k or top_k
        if self.arch in GROUPED_ARCHS and self.num_experts % self.num_groups:
            raise ValueError("num_experts must be a multiple of num_groups")
        if self.hidden_size % 32:
            raise ValueError("hidden_size must be a multiple of 32 (vLLM CPU MoE kernel)")
        if self.head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError("head_dim must be one the vLLM CPU attention supports, e.g. 32")
        if self.vocab_size < 260:
            raise ValueError("vocab_size must hold the 256 bytes and the special tokens")


def _hf_config(spec: TinySpec, tokenizer):
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        # vLLM 0.32's OLMoE hard-codes eps 1e-5 (OLMoE's own value) and ignores the config
        rms_norm_eps=1e-5 if spec.arch == "olmoe" else 1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    cls, fields = _family_fields(spec)
    return getattr(transformers, cls)(**{**common, **fields}, num_experts_per_tok=spec.top_k)


def _family_fields(spec: TinySpec) -> tuple[str, dict]:
    """The family's config class and its MoE fields (each family names them its own way)."""
    e, i = spec.num_experts, spec.moe_intermediate_size
    dense = {"intermediate_size": 4 * spec.hidden_size, "decoder_sparse_step": 1}
    qwen = {"num_experts": e, "moe_intermediate_size": i, "mlp_only_layers": [], **dense}
    return {
        "qwen3_moe": (
            "Qwen3MoeConfig",
            {**qwen, "head_dim": spec.head_dim, "norm_topk_prob": True},
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            {**qwen, "shared_expert_intermediate_size": i, "norm_topk_prob": False},
        ),
        "mixtral": (
            "MixtralConfig",
            {"head_dim": spec.head_dim, "num_local_experts": e, "intermediate_size": i},
        ),
        "olmoe": (
            "OlmoeConfig",
            {"num_experts": e, "intermediate_size": i, "norm_topk_prob": False},
        ),
        "glm4_moe": ("Glm4MoeConfig", {**_grouped_fields(spec), "head_dim": spec.head_dim}),
        "deepseek_v3": (
            "DeepseekV3Config",
            # vLLM reads the router kind from these, as DeepSeek-V3's own config.json has them
            # (transformers' DeepSeek-V3 router is always this one)
            {
                **_grouped_fields(spec),
                **_mla_fields(spec),
                "topk_method": "noaux_tc",
                "scoring_func": "sigmoid",
            },
        ),
        "deepseek_v2": (
            "DeepseekV2Config",
            # softmax scores, groups ranked by their best score, the chosen scores not
            # renormalised (DeepSeek-V2's own config)
            {
                **_grouped_fields(spec),
                **_mla_fields(spec),
                "topk_method": "group_limited_greedy",
                "norm_topk_prob": False,
            },
        ),
        "gpt_oss": (
            "GptOssConfig",
            {
                "head_dim": spec.head_dim,
                "num_local_experts": e,
                "intermediate_size": i,
                # GPT-OSS's YaRN (factor 32), stretched to this model's context
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": False,
                    "original_max_position_embeddings": spec.max_position_embeddings // 32,
                    "rope_theta": 150000.0,
                },
            },
        ),
    }[spec.arch]


def _grouped_fields(spec: TinySpec) -> dict:
    """GLM-4.5 / DeepSeek-V3 MoE fields: grouped sigmoid routing, one shared expert."""
    return {
        "n_routed_experts": spec.num_experts,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "intermediate_size": 4 * spec.hidden_size,
        "n_shared_experts": 1,
        "n_group": spec.num_groups,
        "topk_group": spec.topk_group,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "first_k_dense_replace": spec.first_dense_layers,
        "norm_topk_prob": True,
    }


def _mla_fields(spec: TinySpec) -> dict:
    """DeepSeek-V3's multi-head latent attention, at the one latent size (512 + 64 rope) vLLM's
    CPU MLA decode kernel is built for; the per-head sizes are tiny."""
    return {
        "q_lora_rank": 32,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "num_key_value_heads": spec.num_heads,  # MLA: one latent, every head its own K/V
    }


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    predictor: str = "zero",
    spec: TinySpec | None = None,
    predictor_std: float | None = None,
    tokenizer: str = "byte",
) -> Path:
    """Write a tiny MoE checkpoint to ``out_dir`` and return its path.

    Args:
        seed: seeds every weight (same seed, same tensors).
        predictor: ``"zero"`` writes no predictor tensors (the plugin then starts them at zero,
            as PR2 does); ``"random"`` writes random ones, for tests that need a live predictor.
        spec: model sizes and family.
        predictor_std: std of random predictor weights; default ``spec.router_std``.
        tokenizer: ``"byte"`` (token id == byte) or ``"bpe"`` (a byte-level BPE trained here,
            ChatML specials and chat template; ``generation_config.json`` stops on
            ``<|im_end|>`` and ``<|endoftext|>``), see :mod:`pr2_serve.tiny.tiny_tokenizers`.

    Example:
        >>> make_tiny_model("/tmp/tiny", seed=0, predictor="random")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    from transformers import AutoModelForCausalLM

    spec = spec or TinySpec()
    if predictor not in ("zero", "random"):
        raise ValueError(f"predictor must be 'zero' or 'random', got {predictor!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(tokenizer, spec.vocab_size)
    config = _hf_config(spec, tok)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_routers(model, spec, gen)
    if tokenizer == "bpe":  # a chat model stops at the end of its turn, or of the text
        stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        model.generation_config.eos_token_id = stops
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if predictor == "random":
        std = spec.router_std if predictor_std is None else predictor_std
        _add_random_predictors(out / "model.safetensors", config.to_dict(), spec, gen, std)
    meta = {"seed": seed, "predictor": predictor, "tokenizer": tokenizer}
    (out / "pr2_tiny.json").write_text(json.dumps({**meta, "spec": _spec_dict(spec)}, indent=1))
    _readable_as_umask_allows(out)
    return out


@torch.no_grad()
def _randomise_routers(model, spec: TinySpec, gen: torch.Generator) -> None:
    """Router weights with ``router_std``; router biases (GPT-OSS) and correction biases
    (noaux_tc, a buffer) with ``router_bias_std``, so that they take part in the selection."""
    routers = (".gate.weight", ".router.weight")
    biases = (".router.bias", ".gate.e_score_correction_bias")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, p in tensors:
        if p.shape[0] != spec.num_experts:
            continue
        if name.endswith(routers):
            p.copy_(torch.randn(p.shape, generator=gen) * spec.router_std)
        elif name.endswith(biases):
            p.copy_(torch.randn(p.shape, generator=gen) * spec.router_bias_std)


def _readable_as_umask_allows(folder: Path) -> None:
    """Give every file of ``folder`` the mode a plain ``open()`` would (0666 less the umask):
    transformers writes ``model.safetensors`` through a private temporary file (0600), which
    other users of a shared model store could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _add_random_predictors(weights_file: Path, config: dict, spec: TinySpec, gen, std: float):
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights_file)
    for i in moe_layer_indices(config):
        tensors[predictor_name(i)] = (
            torch.randn(spec.num_experts, spec.hidden_size, generator=gen) * std
        )
    save_file(tensors, weights_file, metadata={"format": "pt"})


def _spec_dict(spec: TinySpec) -> dict:
    return {k: getattr(spec, k) for k in spec.__slots__}


def main(argv: list[str] | None = None) -> None:
    """``pr2-tiny-model DIR [--seed N] [--predictor zero|random] [--arch ...]``."""
    ap = argparse.ArgumentParser(prog="pr2-tiny-model", description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictor", choices=["zero", "random"], default="zero")
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    ap.add_argument("--arch", "--family", choices=ARCHS, default="qwen3_moe")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-experts", type=int, default=0, help="0: the family's (8 or 16)")
    ap.add_argument("--top-k", type=int, default=0, help="0: the family's (2 or 4)")
    ap.add_argument("--moe-intermediate-size", type=int, default=64)
    args = ap.parse_args(argv)
    spec = TinySpec(
        arch=args.arch,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_intermediate_size=args.moe_intermediate_size,
    )
    path = make_tiny_model(
        args.dir, seed=args.seed, predictor=args.predictor, spec=spec, tokenizer=args.tokenizer
    )
    print(
        f"wrote {spec.arch} ({spec.num_layers} layers, {spec.num_experts} experts, "
        f"top-{spec.top_k}, predictor={args.predictor}) to {path}"
    )


if __name__ == "__main__":
    main()
