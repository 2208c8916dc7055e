"""Counts what makes the suite slow, and holds the default tier to a budget.

A vLLM engine costs 40-60 s to build on 2 cores, so the suite's time is mostly the number of
engines it builds: in-process ``RolloutEngine``s, and ``pr2-serve`` subprocesses (each builds
one; counted when they print their ready line, through ``pr2_serve.server.launch.wait_ready``).
Every run ends with the list of who started what. ``--start-budget N`` (``make test`` passes
it) fails the run when more than N were started, so that a new test that starts its own
server, instead of sharing one, is caught the day it is written, not when CI runs out of time.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

import pytest

STARTS: list[tuple[str, str]] = []  # (kind, who)
_current = {"who": "collection"}


def pytest_addoption(parser):
    parser.addoption(
        "--start-budget",
        type=int,
        default=None,
        help="fail the run when it starts more vLLM engines (servers included) than this",
    )


def _record(kind: str) -> None:
    STARTS.append((kind, _current["who"]))


def _count_engine_builds(module) -> None:
    """Wraps the engine module's ``build_llm_engine`` (a test that stubs it out with
    monkeypatch builds nothing and is not counted)."""
    build = module.build_llm_engine

    @functools.wraps(build)
    def counted(*args, **kwargs):
        _record("engine")
        return build(*args, **kwargs)

    module.build_llm_engine = counted


class _OnEngineImport(importlib.abc.MetaPathFinder):
    """Counts engine builds from when ``pr2_serve.engine.rollout_engine`` is first imported
    (importing
    it here would import vLLM, 17 s, into the tier that must not need it)."""

    def find_spec(self, name, path, target=None):
        if name != "pr2_serve.engine.rollout_engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_count(module):
            exec_module(module)
            _count_engine_builds(module)

        spec.loader.exec_module = exec_and_count
        return spec


def pytest_configure(config):
    import pr2_serve.server.launch as launch

    wait_ready = launch.wait_ready

    @functools.wraps(wait_ready)
    def counted(*args, **kwargs):
        out = wait_ready(*args, **kwargs)
        _record("server")
        return out

    launch.wait_ready = counted  # before the test modules import it by name
    if "pr2_serve.engine.rollout_engine" in sys.modules:
        _count_engine_builds(sys.modules["pr2_serve.engine.rollout_engine"])
    else:
        sys.meta_path.insert(0, _OnEngineImport())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["who"] = item.nodeid
    yield
    _current["who"] = "teardown"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    budget = config.getoption("--start-budget")
    tr.section(f"vLLM engines started: {len(STARTS)}" + (f" (budget {budget})" if budget else ""))
    for kind, who in STARTS:
        tr.write_line(f"{kind:7s} {who}")


def pytest_sessionfinish(session, exitstatus):
    budget = session.config.getoption("--start-budget")
    if budget is not None and len(STARTS) > budget and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            f"\nstart budget exceeded: {len(STARTS)} vLLM engines started, budget {budget} "
            "(share a server fixture from tests/conftest.py, or mark the test slow)",
            file=sys.stderr,
        )
