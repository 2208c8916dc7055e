"""The README is a short front page over docs/ pages: under 200 lines, every page linked from
it, and every relative link in it and in the pages leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m]


def test_readme_is_short_and_links_every_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 200
    linked = {(ROOT / target).resolve() for target in links(readme)}
    assert PAGES and not [p.name for p in PAGES if p.resolve() not in linked]


def test_relative_links_lead_to_files():
    broken = []
    for page in [ROOT / "README.md", *PAGES]:
        for target in links(page):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_weight_update_figures_are_the_results_files():
    """``docs/benchmarks.md`` shows what ``benchmarks/weights.py`` wrote (it rewrites them)."""
    from benchmarks.weights_doc import PAGE, block

    assert block() in PAGE.read_text()


def test_the_peer_comparison_figures_are_the_results_files():
    """``docs/benchmarks.md`` shows what ``benchmarks/vs_trl.py`` wrote (it rewrites them)."""
    from benchmarks.vs_trl_doc import PAGE, block

    assert block() in PAGE.read_text()
