"""The package boundaries: the serving package never imports the trainer, and the library
never imports the research code (``trainer/experiments/``: the grids, the counterfactual, the
reports, the demo), which may import the library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            mod = node.module or ""
            name = ".".join([*base, mod] if node.level else [mod]).strip(".")
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def offenders(folder: str, forbidden: str, allowed: str | None = None) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if allowed and path.is_relative_to(ROOT / allowed):
            continue
        mods = imported_modules(path)
        hits = [m for m in mods if m == forbidden or m.startswith(forbidden + ".")]
        bad += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(hits)]
    return bad


def test_the_serving_package_never_imports_the_trainer():
    assert offenders("pr2_serve", "trainer") == []


def test_the_library_never_imports_the_research_code():
    assert offenders("trainer", "trainer.experiments", allowed="trainer/experiments") == []


def test_the_checker_sees_relative_imports(tmp_path):
    probe = ROOT / "trainer" / "experiments" / "grid_run.py"
    assert "trainer.run.config.TrainConfig" in imported_modules(probe)
    assert "trainer.experiments.grid" in imported_modules(probe)


def source_files() -> list[Path]:
    """The packages' own modules (generated gRPC code and package markers aside)."""
    files = [*(ROOT / "pr2_serve").rglob("*.py"), *(ROOT / "trainer").rglob("*.py")]
    return sorted(p for p in files if "_gen" not in p.parts and p.name != "__init__.py")


def test_no_two_modules_share_a_file_name():
    seen: dict[str, list[str]] = {}
    for path in source_files():
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_modules_stay_short_enough_to_read():
    """About 400 lines at most (the house rule, with a little room)."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in source_files()
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}


def test_code_cites_no_issue_numbers_or_outside_notes():
    cited = re.compile(r"[Ii]ssues? #?\d+|shared/notes")
    files = [*source_files(), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    bad = [str(p.relative_to(ROOT)) for p in files if cited.search(p.read_text())]
    assert bad == []
