from __future__ import annotations

import pytest
import torch

from trainer.run.config import REPLAY_MODES, TrainConfig, field_docs, literal_choices, parse_config


def test_every_field_has_a_docstring():
    docs = field_docs(TrainConfig)
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert all(len(d) > 10 for d in docs.values())


def test_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("replay: r3\noff_policy_steps: 4\nlr: 0.001\n")
    (tmp_path / "run.toml").write_text('replay = "r2"\nservers = ["grpc://h:1", "http://h:2"]\n')
    cfg = parse_config(["--config", str(tmp_path / "run.yaml"), "--lr", "0.01"])
    assert (cfg.replay, cfg.off_policy_steps, cfg.lr) == ("r3", 4, 0.01)
    cfg = parse_config(["--config", str(tmp_path / "run.toml"), "--replay", "pr2"])
    assert cfg.replay == "pr2" and cfg.servers == ["grpc://h:1", "http://h:2"]
    with pytest.raises(ValueError, match="replay"):
        parse_config(["--replay", "r4"])
    assert parse_config(["--parallel", "fsdp2"]).parallel == "fsdp2"
    with pytest.raises(ValueError, match="parallel"):
        parse_config(["--parallel", "zero3"])
    (tmp_path / "bad.yaml").write_text("nope: 1\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "bad.yaml")])


def test_literal_fields_are_the_choices(capsys):
    """``replay``, ``predictor_loss``, ``parallel`` are ``Literal`` types: the one list of their
    values, shown by ``--help`` and checked by ``TrainConfig`` (a ValueError naming the field)."""
    choices = literal_choices(TrainConfig)
    assert choices == {
        "replay": ("none", "r2", "r3", "pr2"),
        "predictor_loss": ("kl-post", "l2"),
        "parallel": ("ddp", "fsdp2"),
        "dtype": ("float32", "bfloat16"),
        "device": ("auto", "cpu", "cuda"),
        "on_mismatch": ("push", "fail"),
        "weight_transfer": ("http", "grpc", "gloo", "nccl"),
        "predictor": ("learned", "lookahead", "ridge"),
        "experts_implementation": ("grouped_mm", "eager"),
    }
    assert choices["replay"] == REPLAY_MODES
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    assert "--replay {none,r2,r3,pr2}" in out and "--parallel {ddp,fsdp2}" in out
    with pytest.raises(ValueError, match="predictor_loss"):
        parse_config(["--predictor-loss", "l1"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_trainer_step_on_cuda(tiny_random):
    from trainer.algo.train_step import Learner
    from trainer.run.distributed import synthetic_batch
    from trainer.run.policy import Policy

    policy = Policy(str(tiny_random), device="cuda")
    batch = synthetic_batch(policy)
    cfg = TrainConfig(
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        servers=["http://unused"],
    )
    m, _ = Learner(policy, cfg).train_batch(batch)
    assert m["first_ratio_max_dev"] == 0.0 and m["predictor_loss"] is not None


def test_the_logged_config_names_the_task_only_for_toy_data(tmp_path):
    toy = TrainConfig(servers=["http://x"], task="addition")
    assert toy.to_dict()["task"] == "addition" and toy.to_dict()["dataset"] == "toy:addition"
    data = TrainConfig(servers=["http://x"], dataset=str(tmp_path / "d.jsonl"))
    assert data.to_dict()["task"] is None  # not used with a dataset file
    assert data.to_dict()["api_key"] in (None, "***")


def test_replay_mode_is_one_type_with_what_each_mode_does():
    from trainer.algo.replay_mode import ReplayMode

    cfg = TrainConfig(replay="r2")
    assert cfg.replay is ReplayMode.R2 and cfg.replay == "r2" and cfg.to_dict()["replay"] == "r2"
    table = {
        m.value: (m.replays_server_routes, m.records_old_routes, m.serves_predictor)
        for m in ReplayMode
    }
    assert table == {
        "none": (False, False, False),
        "r2": (False, True, False),
        "r3": (True, False, False),
        "pr2": (True, False, True),
    }
    with pytest.raises(ValueError, match=r"replay must be one of \('none', 'r2', 'r3', 'pr2'\)"):
        TrainConfig(replay="R3")
