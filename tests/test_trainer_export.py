"""The in-memory export gives exactly what the old export wrote (``save_pretrained``, reload,
predictor rename) -- names and values -- for the families whose HF conversion differs, and
the clients stream a state dict as the very bytes ``safetensors.torch.save`` makes, without a
temporary file or a copy of the tensors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load, load_file, save

from pr2_serve.client.payload import weights_payload
from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
from trainer.checkpoint.export import checkpoint_tensors
from trainer.run.policy import Policy


def old_export(model, out_dir, with_predictor: bool) -> dict[str, torch.Tensor]:
    """The export before: save_pretrained, read back, the predictor under ``mlp``."""
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="1000GB")
    t = load_file(str(out_dir / "model.safetensors"))
    return {
        k.replace(".block_sparse_moe.predictor.", ".mlp.predictor."): v
        for k, v in t.items()
        if with_predictor or ".predictor." not in k
    }


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_in_memory_export_equals_the_old_path(arch, tmp_path):
    model_dir = make_tiny_model(
        tmp_path / "model", seed=0, predictor="random", spec=TinySpec(arch=arch)
    )
    policy = Policy(str(model_dir))
    with torch.no_grad():  # predictors trained: they are exported from the model, not the file
        for p in policy.predictor_parameters():
            p.add_(0.5)
    stored = load_file(str(model_dir / "model.safetensors"))
    for with_predictor in (True, False):
        old = old_export(policy.model, tmp_path / f"old-{with_predictor}", with_predictor)
        new = policy.checkpoint_tensors(with_predictor)
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in old)
    assert new.keys() == {k for k in stored if ".predictor." not in k}
    full = load(body(weights_payload(policy.checkpoint_tensors(True))))
    assert full.keys() == stored.keys()  # the names the server loads
    assert {k for k in full if ".predictor." in k} == {
        f"model.layers.{i}.mlp.predictor.weight" for i in range(4)
    }
    # an FSDP2 job passes the gathered state dict (copies, in the model's own names)
    gathered = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    again = checkpoint_tensors(policy.model, gathered, with_predictor=True)
    assert again.keys() == full.keys() and all(torch.equal(again[k], full[k]) for k in full)


def test_export_directory_is_a_loadable_checkpoint(tiny_random, tmp_path):
    policy = Policy(str(tiny_random))
    path = policy.export(tmp_path / "ckpt", with_predictor=True)
    assert (tmp_path / "ckpt" / "config.json").exists()
    assert load_file(str(path)).keys() == load_file(str(tiny_random / "model.safetensors")).keys()


def body(payload) -> bytes:
    return b"".join(bytes(c) for c in payload.chunks(1000))


def test_push_payload_streams_the_tensors_themselves(tmp_path, monkeypatch):
    import tempfile

    def no_temp(*a, **k):
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp)
    tensors = {
        "b.weight": torch.arange(6.0).reshape(2, 3),
        "a.bias": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor([1.5], dtype=torch.float64),
        "aa": torch.arange(4, dtype=torch.int64).reshape(2, 2).t(),  # not contiguous
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 3),
    }
    expected = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    streamed = weights_payload(tensors)
    assert streamed.path is None and body(streamed) == expected  # byte for byte
    assert streamed.size == len(expected)
    assert streamed.sha256 == hashlib.sha256(expected).hexdigest()
    # the body is read from the tensor's own memory: no copy made
    big = torch.zeros(1000)
    view = weights_payload({"big": big}).parts[1]
    big[0] = 7.0
    assert torch.frombuffer(view, dtype=torch.float32)[0] == 7.0
    from_bytes = weights_payload(expected)
    assert body(from_bytes) == expected and from_bytes.sha256 == streamed.sha256
    (tmp_path / "w.safetensors").write_bytes(expected)
    from_file = weights_payload(tmp_path / "w.safetensors")
    assert from_file.parts == () and body(from_file) == expected
    assert (from_file.size, from_file.sha256) == (streamed.size, streamed.sha256)
    assert weights_payload(streamed) is streamed
    with pytest.raises(TypeError, match="weights must be"):
        weights_payload(3)
