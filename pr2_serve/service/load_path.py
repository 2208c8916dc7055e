"""Which server-side paths ``POST /v1/weights/load/{version}`` may read; no fastapi or torch.

A path from the network names a checkpoint on the server's own filesystem (shared storage, a
trainer checkpoint). It is accepted only inside the directory given by ``pr2-serve
--weights-dir``: relative paths are taken from that directory, ``..`` is refused outright, and
the path is resolved (every symlink followed) before the containment check, so a symlink that
leads out of the directory is refused too. Without ``--weights-dir`` the route is disabled.
A directory means its weight files, chosen as every other reader of a checkpoint chooses them
(:func:`pr2_serve.core.served_checkpoint.weight_files`: an HF checkpoint, sharded or not, or a
trainer
``checkpoint-N``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pr2_serve.service.errors import ApiError

__all__ = ["files_to_load", "resolve_load_path"]


def _forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message, "path")


def resolve_load_path(path: str, weights_dir: str | None) -> Path:
    """The real path ``path`` names, if it lies inside ``weights_dir`` (else a 403 naming the
    rule; a 404 if it does not exist)."""
    if weights_dir is None:
        raise _forbidden(
            "loading weights from a path is disabled: start pr2-serve with --weights-dir DIR "
            "to allow paths inside DIR"
        )
    if not path or "\x00" in path:
        raise ApiError(400, "invalid_argument", "path must be a non-empty path", "path")
    if ".." in PurePosixPath(path).parts:
        raise _forbidden(f"{path!r}: '..' is not allowed in a path")
    root = Path(weights_dir).resolve()
    real = (root / path).resolve()  # an absolute `path` replaces `root` here
    if not real.is_relative_to(root):
        raise _forbidden(
            f"{path!r} resolves to {real}, outside --weights-dir {root} (symlinks are followed)"
        )
    if not real.exists():
        raise ApiError(404, "not_found", f"{path!r}: no such file or directory", "path")
    return real


def files_to_load(real: Path, weights_dir: str) -> list[Path]:
    """The safetensors files a resolved load path stands for: the file itself, or a
    checkpoint directory's weight files by the one rule of :func:`pr2_serve.core.served_checkpoint.
    weight_files` (a ``pr2-train`` ``checkpoint-N``: its ``model.safetensors``, not its
    optimizer state). 400 if none; 403 for a file of a sharded index that resolves outside
    ``weights_dir``."""
    from pr2_serve.core.served_checkpoint import weight_files

    what = "not a .safetensors file or a checkpoint directory holding one"
    if not real.is_dir():
        if real.suffix != ".safetensors":
            raise ApiError(400, "invalid_argument", f"{real}: {what}", "path")
        return [real]
    try:
        files = [f.resolve() for f in weight_files(real)]
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ApiError(400, "invalid_argument", f"{real}: {what} ({e})", "path") from e
    root = Path(weights_dir).resolve()
    for f in files:
        if not f.is_relative_to(root):
            raise _forbidden(f"{real}: its index names {f}, outside --weights-dir {root}")
        if not f.is_file():
            raise ApiError(
                404, "not_found", f"{real}: its index names {f}, which is missing", "path"
            )
    return files
