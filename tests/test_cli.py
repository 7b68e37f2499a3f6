"""`tritonrnn info`: versions, device, and which path a shape takes."""
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ON_GPU
from tritonrnn import cli, kernel_path


def test_info_reports_versions_backend_and_path(capsys):
    assert cli.main(["info", "--hidden-size", "64", "--seq-len", "32", "--dtype", "float32"]) == 0
    text = capsys.readouterr().out
    assert f"torch     {torch.__version__}" in text
    assert "triton" in text
    expected_backend = "triton" if ON_GPU else "triton-interpreter"
    assert f"backend on {'cuda' if ON_GPU else 'cpu'}: {expected_backend}" in text
    assert "forward: sequence path" in text and "backward: sequence path" in text


def test_info_names_the_stepwise_path_for_large_hidden(capsys):
    cli.main(["info", "--hidden-size", "4096", "--seq-len", "16"])
    assert "forward: stepwise path" in capsys.readouterr().out
    assert kernel_path(16, 4096, torch.float32) == "stepwise"
    assert kernel_path(1, 32, torch.float32) == "stepwise"  # one step: the step kernel
    assert kernel_path(16, 32, torch.float32) == "sequence"


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "tritonrnn"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tritonrnn.cli"]
    result = subprocess.run(command + ["info"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("tritonrnn ")
