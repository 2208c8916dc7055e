"""Checks ``pr2-serve`` makes before loading anything: the model directory is a model and is
only read; the state directory is the server's own, writable, with room to store a push.

Each failure is a :class:`StartupError` whose message is one line naming the path and the flag
to change; ``pr2-serve`` prints it and exits non-zero, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from pr2_serve.server.server_config import ServerConfig, default_state_dir

__all__ = ["MIN_FREE_BYTES", "StartupError", "check_model_dir", "check_state_dir", "preflight"]

MIN_FREE_BYTES = 16 << 20  # below this the state directory's disk counts as full
PROBE_BYTES = 64 << 10
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StartupError(Exception):
    """A setting ``pr2-serve`` cannot start with (the message names the path and the flag)."""


def check_model_dir(model: str | os.PathLike) -> Path:
    """The resolved model directory, or :class:`StartupError` if it does not exist, cannot be
    read, or holds no ``config.json`` and safetensors weights."""
    path = Path(model).expanduser()
    if not path.exists():
        raise StartupError(f"model directory {path} does not exist (--model)")
    if not path.is_dir():
        raise StartupError(f"--model {path} is not a directory")
    try:
        names = {p.name for p in path.iterdir()}
        config = json.loads((path / "config.json").read_text()) if "config.json" in names else None
    except PermissionError as e:
        raise StartupError(
            f"cannot read the model directory {path}: {e.strerror} (--model)"
        ) from None
    except (OSError, ValueError) as e:
        raise StartupError(f"{path / 'config.json'} is not readable JSON ({e}) (--model)") from None
    if config is None:
        raise StartupError(f"{path} is not a model directory: no config.json (--model)")
    if not isinstance(config, dict) or "model_type" not in config:
        raise StartupError(f"{path / 'config.json'} is not a model config: no model_type (--model)")
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        raise StartupError(f"{path} is not a model directory: no *.safetensors weights (--model)")
    for name in ["config.json", *weights]:
        if not os.access(path / name, os.R_OK):
            raise StartupError(f"cannot read {path / name}: permission denied (--model)")
    return path.resolve()


def check_state_dir(state_dir: str | os.PathLike, model_dir: Path) -> Path:
    """The resolved state directory, created if needed, or :class:`StartupError` if it lies
    inside the model directory, cannot be created or written, or its disk is full."""
    path = Path(state_dir).expanduser().resolve()
    if path.is_relative_to(model_dir):
        raise StartupError(
            f"state directory {path} is inside the model directory {model_dir}, which is only "
            "read: choose another with --state-dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_write(path)
        free = shutil.disk_usage(path).free
    except OSError as e:
        if e.errno in NO_SPACE:
            raise StartupError(_full(path, "no space left")) from None
        raise StartupError(
            f"state directory {path} is not writable ({e.strerror}): choose another with "
            "--state-dir or make it writable by this user"
        ) from None
    if free < MIN_FREE_BYTES:
        raise StartupError(_full(path, f"only {free >> 20} MiB free"))
    return path


def _full(path: Path, what: str) -> str:
    return (
        f"the disk of state directory {path} is full ({what}; a weight push needs room for the "
        "whole file): free space or choose another --state-dir"
    )


def _probe_write(folder: Path) -> None:
    """Write (and remove) a small file in ``folder``: permission, read-only mounts, a full
    disk all show here."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def preflight(cfg: ServerConfig) -> Path:
    """Check the model directory, the state directory and the flags that need no engine;
    return the state directory to use."""
    if cfg.keep_versions < 1:
        raise StartupError(f"--keep-versions must be >= 1 (got {cfg.keep_versions})")
    if cfg.persist not in ("sync", "async"):
        raise StartupError(f"--persist must be 'sync' or 'async' (got {cfg.persist!r})")
    if cfg.apply_uploads not in ("streamed", "stored"):
        raise StartupError(
            f"--apply-uploads must be 'streamed' or 'stored' (got {cfg.apply_uploads!r})"
        )
    if not cfg.bucket_mib > 0:
        raise StartupError(f"--bucket-mib must be > 0 (got {cfg.bucket_mib})")
    if cfg.undo_limit_mib < 0:
        raise StartupError(f"--undo-limit-mib must be >= 0 (got {cfg.undo_limit_mib})")
    if cfg.api_key_file:
        try:
            Path(cfg.api_key_file).read_text()
        except OSError as e:
            raise StartupError(
                f"cannot read the API key file {cfg.api_key_file}: {e.strerror} (--api-key-file)"
            ) from None
    model_dir = check_model_dir(cfg.model)
    return check_state_dir(cfg.state_dir or default_state_dir(model_dir), model_dir)
