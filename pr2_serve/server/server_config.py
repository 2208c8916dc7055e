"""``pr2-serve`` configuration: one dataclass whose fields, each with its help, are the flags.

:class:`ServerConfig` holds every option of the server (``--http-port`` is the field
``http_port``); :func:`parse_args` builds the argparse parser from its fields. :class:`Limits`
are the service's per-request limits; their defaults are written here once and are the
flags' defaults. :func:`validate_parallelism` refuses vLLM parallelism flags this deployment
cannot honour, :func:`validate_attention_backend` an attention backend vLLM does not know;
:func:`engine_kwargs` turns the config into the engine's arguments;
:func:`default_state_dir` is where a server keeps its state unless ``--state-dir`` says.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_type_hints

__all__ = [
    "KEEP_ALIVE_S",
    "UPLOAD_BUCKET_MIB",
    "Limits",
    "ServerConfig",
    "default_state_dir",
    "engine_kwargs",
    "parse_args",
    "validate_attention_backend",
    "validate_parallelism",
]

KEEP_ALIVE_S = 75.0  # idle HTTP keep-alive, seconds
UPLOAD_BUCKET_MIB = 8.0  # --bucket-mib
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")  # vLLM's names (--logprobs-mode)
VLLM_GROUP = "vLLM pass-through"


@dataclass(slots=True)
class Limits:
    """What one request may ask of the service (refused with 4xx beyond)."""

    max_request_bytes: int = 16 << 20  # generate bodies
    max_upload_bytes: int = 64 << 30  # weight files
    max_queued_jobs: int = 256
    max_samples_per_request: int = 4096  # prompts x n
    max_tokens_per_request: int = 1 << 22  # prompts x n x max_tokens
    # OpenAI routes: routed_experts on every choice, not only when a request asks (vLLM's flag)
    enable_return_routed_experts: bool = False


_LIMITS = Limits()


def option(default: Any = MISSING, help: str = "", group: str | None = None) -> Any:
    """A :class:`ServerConfig` field: its default, its ``--help`` text, its argparse group."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(kw_only=True)
class ServerConfig:
    """Every ``pr2-serve`` option; the flag of field ``x_y`` is ``--x-y``."""

    model: str = option(help="HF checkpoint directory")
    host: str = option("127.0.0.1", "bind address (default: loopback)")
    http_port: int = option(8000, "HTTP port (0: any free port)")
    grpc_port: int = option(50051, "gRPC port (0: any free port)")
    api_key_file: str | None = option(None, "file holding the API key (else $PR2_API_KEY)")
    state_dir: str | None = option(
        None,
        "the server's own writable directory: pushed weights, the committed version and the "
        "versions kept for rollback (default: $XDG_STATE_HOME/pr2/<model name>-<hash of its "
        "path>, else ~/.local/state/pr2/...; never inside the model directory, which is only read)",
    )
    fresh: bool = option(
        False, "start on the model directory's weights: forget the state directory's commits"
    )
    keep_versions: int = option(
        2, "committed weight versions kept in the state directory (rollback targets), >= 1"
    )
    persist: str = option(
        "sync",
        "when a pushed version is recorded in the state directory: 'sync' before the push is "
        "answered; 'async' after (its files flushed to the disk, then committed.json, on a "
        "thread while the next update runs; a restart before that restores the version before)",
    )
    apply_uploads: str = option(
        "streamed",
        "how a pushed upload (HTTP PUT /v1/weights, gRPC UpdateWeights) or a loaded one-file "
        "checkpoint is applied: 'streamed' bucket by bucket as it arrives (receive and apply "
        "overlap; generation waits from its first complete bucket to the canary); 'stored' "
        "received whole into its file first (generation goes on meanwhile), then applied: for "
        "links or storage slower than the apply (a sharded checkpoint is always loaded so)",
    )
    bucket_mib: float = option(
        UPLOAD_BUCKET_MIB,
        "bucket size of an update read from an upload or a file, MiB (a collective transfer's "
        "comes with its init request): received, checked and applied one bucket at a time; "
        "small buckets are recycled by the allocator instead of being page-faulted in anew",
    )
    undo_limit_mib: int = option(
        8192,
        "MiB of previous tensor values an update keeps to undo itself bit for bit on a failure "
        "(the whole model for a full update; past it nothing more is kept and a failed update "
        "reloads the previous version from the state directory instead)",
    )
    weights_dir: str | None = option(
        None,
        "allow POST /v1/weights/load/{version} (gRPC LoadWeights) to load checkpoints from "
        "paths inside this directory (symlinks resolved; '..' refused); absent: disabled",
    )
    enable_weight_transfer: bool = option(
        False,
        "allow POST /v1/weights/transfer/* and gRPC TransferInit/TransferWeights (collective "
        "weight transfer): the server then joins "
        "gloo groups at the trainer address a request names; absent: refused with 403",
    )
    dtype: str = option(
        "auto",
        "model dtype (vLLM's --dtype; auto serves an fp32 checkpoint in bfloat16, float32 keeps "
        "it; /v1/info reports the dtype served)",
    )
    seed: int = option(0, "engine seed (requests without a seed draw from it)")
    max_upload_bytes: int = option(_LIMITS.max_upload_bytes, "largest weight upload, bytes")
    keep_alive_timeout: float = option(
        KEEP_ALIVE_S,
        "seconds an idle HTTP keep-alive connection stays open (clients must expire "
        "pooled connections sooner; pr2_serve.client does, after 30 s)",
    )
    max_request_bytes: int = option(_LIMITS.max_request_bytes, "largest generate body, bytes")
    max_samples_per_request: int = option(_LIMITS.max_samples_per_request, "prompts x n")
    max_tokens_per_request: int = option(_LIMITS.max_tokens_per_request, "prompts x n x max_tokens")
    no_prefix_caching: bool = option(False, "turn vLLM's prefix caching off")
    logprobs_mode: str = option(
        "raw_logprobs",
        "log-probs returned: raw_logprobs (the model's, before temperature/top-k/top-p: what "
        "pr2-train recomputes) or processed_logprobs (after them: what TRL expects)",
        VLLM_GROUP,
    )
    enable_return_routed_experts: bool = option(
        False,
        'OpenAI routes: routed_experts on every choice (else only with "return_routed_experts": '
        "true in the request)",
    )
    kv_cache_gib: int = option(1, "CPU build: KV cache size")
    max_model_len: int | None = option(None, "context length", VLLM_GROUP)
    tensor_parallel_size: int = option(1, "GPUs per engine (tensor parallel)", VLLM_GROUP)
    data_parallel_size: int = option(
        1, "refused above 1: run one pr2-serve per replica", VLLM_GROUP
    )
    enable_expert_parallel: bool = option(
        False, "shard experts across the tensor-parallel GPUs", VLLM_GROUP
    )
    gpu_memory_utilization: float | None = option(None, "GPU memory share, (0, 1]", VLLM_GROUP)
    max_num_seqs: int | None = option(None, "sequences per engine step", VLLM_GROUP)
    max_num_batched_tokens: int | None = option(None, "tokens per engine step", VLLM_GROUP)
    attention_backend: str | None = option(
        None,
        "attention backend by vLLM's name (FLASH_ATTN, TRITON_MLA, CPU_ATTN, CPU_MLA, ...; "
        "'auto' or absent: vLLM's choice, except an fp32 MLA model on a CPU with AMX, which gets "
        "CPU_MLA: vLLM's AMX backend cannot load fp32 weights)",
        VLLM_GROUP,
    )

    def limits(self) -> Limits:
        """The service limits set by this config (the others at their defaults)."""
        names = {f.name for f in fields(self)}
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits) if f.name in names})


def default_state_dir(model: str | os.PathLike, env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/pr2/<model name>-<8 hex of the resolved model path>`` (XDG unset or
    relative: ``~/.local/state``): one directory per user and model, outside the model."""
    env = os.environ if env is None else env
    resolved = Path(model).expanduser().resolve()
    xdg = env.get("XDG_STATE_HOME", "")
    home = Path(env.get("HOME") or Path.home())
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "state"
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return root / "pr2" / f"{resolved.name or 'model'}-{digest}"


def _flag_type(hint: Any) -> type:
    """``int`` for ``int`` and ``int | None`` (argparse's converter)."""
    if isinstance(hint, UnionType):
        return next(t for t in get_args(hint) if t is not type(None))
    return hint


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The ``pr2-serve`` parser: one flag per :class:`ServerConfig` field."""
    ap = argparse.ArgumentParser(prog="pr2-serve", description=description)
    groups: dict[str | None, Any] = {None: ap}
    hints = get_type_hints(ServerConfig)
    for f in fields(ServerConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = ap.add_argument_group(group)
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": f.metadata["help"]}
        if hints[f.name] is bool:
            kw["action"] = "store_true"
        elif f.default is MISSING:
            kw.update(required=True, type=_flag_type(hints[f.name]))
        else:
            kw.update(default=f.default, type=_flag_type(hints[f.name]))
        groups[group].add_argument(flag, **kw)
    return ap


def parse_args(argv: list[str] | None = None, description: str | None = None) -> ServerConfig:
    """The :class:`ServerConfig` of a command line (``sys.argv[1:]`` by default)."""
    return ServerConfig(**vars(build_parser(description).parse_args(argv)))


def validate_parallelism(cfg: ServerConfig, on_cpu: bool) -> None:
    """Clear errors for vLLM parallelism flags this deployment cannot honour."""
    if cfg.data_parallel_size != 1:
        raise SystemExit(
            "--data-parallel-size > 1: start one pr2-serve per replica and give "
            "the trainer every address (route capture is per engine)"
        )
    if cfg.tensor_parallel_size < 1:
        raise SystemExit("--tensor-parallel-size must be >= 1")
    if on_cpu:
        if cfg.tensor_parallel_size > 1:
            raise SystemExit(
                "--tensor-parallel-size > 1 needs GPUs: the CPU build serves on one "
                "socket; run several pr2-serve processes instead"
            )
        if cfg.enable_expert_parallel:
            raise SystemExit(
                "--enable-expert-parallel needs GPUs (it shards experts across "
                "devices); not available on the CPU build"
            )
        if cfg.gpu_memory_utilization is not None:
            raise SystemExit(
                "--gpu-memory-utilization has no meaning on the CPU build: size the "
                "KV cache with --kv-cache-gib"
            )
    elif cfg.enable_expert_parallel and cfg.tensor_parallel_size < 2:
        raise SystemExit("--enable-expert-parallel needs --tensor-parallel-size >= 2")
    if cfg.gpu_memory_utilization is not None and not 0 < cfg.gpu_memory_utilization <= 1:
        raise SystemExit("--gpu-memory-utilization must be in (0, 1]")


def validate_attention_backend(cfg: ServerConfig) -> None:
    """A clear error for an ``--attention-backend`` vLLM does not know, before the engine
    starts (vLLM's own parser: any case, ``auto`` for its choice)."""
    if cfg.attention_backend is None:
        return
    from vllm.config.attention import AttentionConfig

    try:
        AttentionConfig.validate_backend_before(cfg.attention_backend)
    except ValueError as e:
        raise SystemExit(f"--attention-backend: {e}") from None


def engine_kwargs(cfg: ServerConfig) -> dict:
    """:class:`RolloutEngine` keyword arguments (after :func:`validate_parallelism`)."""
    kw: dict = {
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "kv_cache_gib": cfg.kv_cache_gib,
        "enable_prefix_caching": not cfg.no_prefix_caching,
        "max_model_len": cfg.max_model_len,
        "logprobs_mode": cfg.logprobs_mode,
        "undo_limit": cfg.undo_limit_mib << 20,
    }
    if cfg.logprobs_mode not in LOGPROBS_MODES:
        raise SystemExit(f"--logprobs-mode must be one of {', '.join(LOGPROBS_MODES)}")
    if cfg.tensor_parallel_size != 1:
        kw["tensor_parallel_size"] = cfg.tensor_parallel_size
    for name in ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens"):
        value = getattr(cfg, name)
        if value is not None:
            kw[name] = value
    if cfg.enable_expert_parallel:
        kw["enable_expert_parallel"] = True
    if cfg.attention_backend is not None and cfg.attention_backend.lower() != "auto":
        kw["attention_backend"] = cfg.attention_backend
    return kw
