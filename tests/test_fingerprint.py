"""Weight fingerprints: the server's (over files) equals the trainer's (over tensors)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from pr2_serve.core.fingerprint import FileDigests, tensors_fingerprints

PRED = "model.layers.0.mlp.predictor.weight"


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(3, 4, generator=g),
    }


def test_files_and_tensors_agree_and_missing_predictor_is_zero(tmp_path):
    w = _weights()
    save_file(w, str(tmp_path / "a.safetensors"))
    files = dict.fromkeys(w, str(tmp_path / "a.safetensors"))
    shapes = {PRED: (3, 4)}
    server = FileDigests().fingerprints(files, shapes)
    assert server == tensors_fingerprints(w, shapes)
    assert server == tensors_fingerprints({**w, PRED: torch.zeros(3, 4)}, shapes)
    live = tensors_fingerprints({**w, PRED: torch.ones(3, 4)}, shapes)
    assert live["policy"] == server["policy"] and live["predictor"] != server["predictor"]


def test_bf16_checkpoint_matches_fp32_trainer_and_any_change_shows(tmp_path):
    w = {k: v.to(torch.bfloat16) for k, v in _weights().items()}
    save_file(w, str(tmp_path / "b.safetensors"))
    files = dict.fromkeys(w, str(tmp_path / "b.safetensors"))
    server = FileDigests().fingerprints(files, {})
    trainer = {k: v.float() for k, v in w.items()}  # loaded in fp32 from the bf16 file
    assert server == tensors_fingerprints(trainer, {})
    trainer["model.layers.0.mlp.gate.weight"][0, 0] += 1e-3
    assert tensors_fingerprints(trainer, {})["policy"] != server["policy"]
    assert tensors_fingerprints(_weights(1), {})["policy"] != server["policy"]
