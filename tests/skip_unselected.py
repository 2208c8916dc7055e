"""A test module none of whose tests ``-m`` selects is not imported at all.

Importing a module that needs vLLM costs ~15 s on 2 cores, which ``make test-fast``
(``-m "not vllm and not slow"``) would pay only to deselect every test in it. The marks are read
from the source (the module's ``pytestmark`` and each test's ``@pytest.mark.NAME`` decorators,
class decorators included) and the ``-m`` expression is evaluated for each test; a module that
sets marks another way (``pytest.param(..., marks=...)``, marks applied at run time) is always
imported, as is every module when no ``-m`` is given.
"""

from __future__ import annotations

import ast
from pathlib import Path

from _pytest.mark.expression import Expression


def _mark_names(node: ast.AST) -> set[str]:
    """``NAME`` of every ``pytest.mark.NAME`` inside ``node``."""
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "mark"
    }


def _tests_marks(tree: ast.Module) -> list[set[str]] | None:
    """The marks of each test of a module (its own and the module's); None: not knowable
    from the source."""
    if any(isinstance(n, ast.Attribute) and n.attr == "param" for n in ast.walk(tree)):
        return None
    module: set[str] = set()
    tests: list[set[str]] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module |= _mark_names(node.value)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.startswith(
            ("test", "Test")
        ):
            own = set().union(*(_mark_names(d) for d in node.decorator_list))
            if isinstance(node, ast.ClassDef):
                return None  # methods may carry marks of their own: import it
            tests.append(own)
    return [module | own for own in tests]


def pytest_ignore_collect(collection_path: Path, config):
    markexpr = config.getoption("markexpr")
    if (
        not markexpr
        or collection_path.suffix != ".py"
        or not collection_path.name.startswith("test_")
    ):
        return None
    marks = _tests_marks(ast.parse(collection_path.read_text()))
    if marks is None or not marks:
        return None
    expr = Expression.compile(markexpr)
    if any(expr.evaluate(lambda name, m=m, **_: name in m) for m in marks):
        return None
    return True
