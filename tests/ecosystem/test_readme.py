"""Every code block of README.md runs as written: python blocks in a fresh interpreter each, bash
blocks in bash from the repository root, on the CPU where there is no GPU and without
TRITON_INTERPRET (as a user's shell has it). Bash blocks whose first line is a comment starting with
`# long-running` (installs, benchmarks, the suite itself) are skipped, explicitly.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LONG_RUNNING = "# long-running"
# Never run from a test, marker or not: they would change the environment or run the suite again.
NEVER = ("pip install", "-m venv", "pytest")


def _blocks(language: str) -> list[str]:
    """The fenced blocks of one language, dedented (blocks inside list items are indented)."""
    pattern = rf"^( *)```{language}\n(.*?)^\1```$"
    return [re.sub(rf"^{indent}", "", body, flags=re.M)
            for indent, body in re.findall(pattern, (ROOT / "README.md").read_text(), flags=re.M | re.S)]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's tritonrnn
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _ids(blocks):
    return [f"{i}-{block.splitlines()[0][:40]}" for i, block in enumerate(blocks)]


PYTHON = _blocks("python")
BASH = _blocks("bash")


def test_readme_blocks_found():
    assert PYTHON and any(not block.startswith(LONG_RUNNING) for block in BASH)


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs(block):
    if "from opacus" in block and importlib.util.find_spec("opacus") is None:
        pytest.skip("the block needs Opacus (the dp extra)")
    result = _run([sys.executable, "-c", block])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("block", BASH, ids=_ids(BASH))
def test_bash_block_runs(block):
    if block.startswith(LONG_RUNNING):
        pytest.skip(block.splitlines()[0])
    assert not any(word in block for word in NEVER), f"mark this block {LONG_RUNNING!r}:\n{block}"
    result = _run(["bash", "-euo", "pipefail", "-c", block])
    assert result.returncode == 0, result.stdout + result.stderr
