"""``pr2-serve``'s flags come from ``ServerConfig`` (``pr2_serve.server.server_config``)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from pr2_serve.server.server_config import (
    KEEP_ALIVE_S,
    Limits,
    ServerConfig,
    build_parser,
    parse_args,
)

# every flag pr2-serve had before ServerConfig, with its default (README, Dockerfile, tests)
FLAGS = {
    "--model": None,
    "--host": "127.0.0.1",
    "--http-port": 8000,
    "--grpc-port": 50051,
    "--api-key-file": None,
    "--state-dir": None,
    "--dtype": "auto",
    "--seed": 0,
    "--max-upload-bytes": 64 << 30,
    "--keep-alive-timeout": KEEP_ALIVE_S,
    "--max-request-bytes": 16 << 20,
    "--max-samples-per-request": 4096,
    "--max-tokens-per-request": 1 << 22,
    "--no-prefix-caching": False,
    "--kv-cache-gib": 1,
    "--max-model-len": None,
    "--tensor-parallel-size": 1,
    "--data-parallel-size": 1,
    "--enable-expert-parallel": False,
    "--gpu-memory-utilization": None,
    "--max-num-seqs": None,
    "--max-num-batched-tokens": None,
}


def test_every_flag_and_default_is_kept():
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    assert set(FLAGS) <= set(actions)
    for flag, default in FLAGS.items():
        assert actions[flag].default == default, flag
    assert actions["--model"].required


def test_every_field_is_a_documented_flag():
    for f in fields(ServerConfig):
        assert f.metadata["help"], f.name
    flags = {a.dest for a in build_parser()._actions if a.option_strings} - {"help"}
    assert flags == {f.name for f in fields(ServerConfig)}


def test_limit_defaults_are_the_service_defaults():
    assert parse_args(["--model", "m"]).limits() == Limits()


def test_flags_set_the_limits_and_types():
    flags = "--max-upload-bytes 10 --max-tokens-per-request 7 --gpu-memory-utilization 0.5"
    cfg = parse_args(
        ["--model", "m", *flags.split(), "--no-prefix-caching", "--keep-alive-timeout", "9"]
    )
    assert cfg.limits() == Limits(max_upload_bytes=10, max_tokens_per_request=7)
    assert cfg.gpu_memory_utilization == 0.5 and cfg.no_prefix_caching is True
    assert cfg.keep_alive_timeout == 9.0


def test_model_is_required():
    with pytest.raises(SystemExit):
        parse_args([])
