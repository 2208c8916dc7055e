"""A generated block of a docs page: the figures a benchmark's ``*_doc.py`` renders from its
results files stand between two HTML-comment markers of the page, which :func:`rewrite` replaces
(with the markers' indentation, for a block inside a list item)."""

from __future__ import annotations

import re
from pathlib import Path


def rewrite(page: Path, begin: str, end: str, block: str, what: str) -> None:
    """Put ``block`` (markers included) where the page's ``begin`` ... ``end`` block stands."""
    text = page.read_text()
    pattern = re.compile(r"[ \t]*" + re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no {begin} ... {end} block")
    page.write_text(pattern.sub(lambda _: block, text, count=1))
    print(f"wrote the {what} block of {page}")
