"""Nothing from the network is unpickled, anywhere in the code; the server binds loopback."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = [
    r"\bpickle\.loads?\(",
    r"\bcloudpickle\b",
    r"\bdill\b",
    r"\bmarshal\.loads?\(",
    r"\btorch\.load\(",
    r"allow_pickle\s*=\s*True",
    r"\bjoblib\.load\(",
    r"\byaml\.load\(",
    r"\bbroadcast_object_list\(",
    r"\bshelve\.open\(",
]


def unpickling_sites() -> list[str]:
    """``file:line: code`` of every use of an unpickling API in our code."""
    hits = []
    for folder in ("pr2_serve", "trainer", "benchmarks", "reliability"):
        for path in (ROOT / folder).rglob("*.py"):
            if "_gen" in path.parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if any(re.search(p, code) for p in PATTERNS):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    return hits


def test_no_unpickling_apis():
    assert unpickling_sites() == []


def test_the_grep_would_catch_one(tmp_path):
    assert any(re.search(p, "obj = pickle.loads(data)") for p in PATTERNS)
    assert any(re.search(p, "sd = torch.load(f)") for p in PATTERNS)


def test_default_bind_is_loopback():
    from pr2_serve.server.main import parse_args

    assert parse_args(["--model", "m"]).host == "127.0.0.1"
