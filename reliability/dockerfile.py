"""Read a Dockerfile stage and turn its steps into commands for this machine (no Docker engine).

:func:`stage` gives one stage's instructions (continuations joined, comments dropped);
:func:`run_steps` splits its ``RUN`` lines into single commands (``a && b`` -> two steps);
:func:`local_command` maps one step onto a virtualenv and local paths, or says it is a system
step (user creation, ownership) that the caller follows its own way. Pure: no I/O but the text.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

__all__ = ["Instruction", "Stage", "local_command", "run_steps", "stage"]


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # RUN, COPY, ENV, ...
    args: str


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    base: str
    instructions: list[Instruction]
    args: dict[str, str]  # global ARG defaults

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """``ENV`` assignments (``K=V K2=V2`` form)."""
        out: dict[str, str] = {}
        for line in self.all("ENV"):
            for part in shlex.split(line):
                key, _, value = part.partition("=")
                out[key] = value
        return out

    def copies(self) -> list[tuple[list[str], str]]:
        """``COPY src... dest`` as ``([src...], dest)``."""
        out = []
        for line in self.all("COPY"):
            *src, dest = shlex.split(line)
            out.append((src, dest))
        return out

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON (exec) form of the last ``ENTRYPOINT`` / ``CMD``."""
        return json.loads(self.all(keyword)[-1])


def _logical_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined; comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        out.append(current + line)
        current = ""
    return out


def stage(text: str, name: str) -> Stage:
    """The stage ``FROM ... AS name`` of a Dockerfile."""
    args: dict[str, str] = {}
    found: Stage | None = None
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.I)
            if found is not None:
                break
            if m and m.group(2) == name:
                found = Stage(name, m.group(1), [], args)
            continue
        if found is None:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key.strip()] = value.strip()
            continue
        found.instructions.append(Instruction(keyword, rest.strip()))
    if found is None:
        raise ValueError(f"no stage {name!r} in the Dockerfile")
    return found


def run_steps(st: Stage) -> list[list[str]]:
    """Every ``RUN`` of the stage as single commands (argv lists, ``${ARG}`` expanded)."""
    steps = []
    for line in st.all("RUN"):
        for part in re.split(r"\s&&\s", line):
            expanded = re.sub(r"\$\{(\w+)\}", lambda m: st.args.get(m.group(1), m.group(0)), part)
            steps.append(shlex.split(expanded))
    return steps


def local_command(
    step: list[str], venv_bin: str, wheel: str | None, drop_indexes: set[str]
) -> list[str] | None:
    """``step`` on this machine: ``pip``/``python`` from ``venv_bin``; a local source
    (``.`` or ``.[extra]``) replaced by ``wheel`` (with the extra); extra indexes in
    ``drop_indexes`` left out. None for a system step (``useradd``, ``mkdir``, ``chown``)
    the caller maps itself; ValueError for a step it does not know."""
    exe, *rest = step
    if exe in ("useradd", "mkdir", "chown"):
        return None
    if exe not in ("pip", "python", "python3"):
        raise ValueError(f"a step the recipe test cannot follow: {shlex.join(step)}")
    out = [f"{venv_bin}/{'pip' if exe == 'pip' else 'python'}"]
    skip = False
    for i, arg in enumerate(rest):
        if skip:
            skip = False
            continue
        if arg == "--extra-index-url" and rest[i + 1] in drop_indexes:
            skip = True
            continue
        m = re.fullmatch(r"\.(\[[\w,]+\])?", arg)
        if m and exe == "pip":
            if wheel is None:
                raise ValueError("a local install needs the wheel built first")
            arg = wheel + (m.group(1) or "")
        out.append(arg)
    return out
