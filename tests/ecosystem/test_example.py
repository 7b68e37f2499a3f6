"""examples/char_rnn.py: a few training steps with both backends, whose losses must coincide."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonrnn
from conftest import DEVICE, load_example

ROOT = Path(__file__).resolve().parents[2]


def test_char_rnn_backends_coincide(tmp_path):
    char_rnn = load_example("char_rnn")
    summary = char_rnn.main(["--steps", "3", "--seq-len", "12", "--batch", "4", "--hidden", "24", "--sample", "20",
                             "--out-dir", str(tmp_path)])
    tritonrnn_run, torch_run = summary["results"]
    assert [tritonrnn_run["backend"], torch_run["backend"]] == ["tritonrnn", "torch"]
    assert len(tritonrnn_run["losses"]) == 3
    assert summary["max_loss_difference"] < 1e-4
    assert torch_run["losses"][0] > 3.0  # ~ln(vocabulary) at the start: a real corpus, a real model
    png = tmp_path / summary["plot"]
    assert png.stat().st_size > 1000
    recorded = json.loads(png.with_suffix(".json").read_text())["results"]
    assert recorded[1]["tokens_per_second"] > 0
    interpreted = tritonrnn.backend(DEVICE) == "triton-interpreter"
    assert recorded[0]["interpreted"] is interpreted
    assert (recorded[0]["tokens_per_second"] is None) is interpreted  # the interpreter's time is not a speed


def test_char_rnn_plot_legend_and_integer_step_ticks():
    char_rnn = load_example("char_rnn")
    results = [{"backend": "tritonrnn", "losses": [4.2, 4.0, 3.9], "interpreted": True, "tokens_per_second": None},
               {"backend": "torch", "losses": [4.2, 4.0, 3.9], "interpreted": False, "tokens_per_second": 1234.5}]
    fig = char_rnn.loss_figure(results, "title")
    ax = fig.axes[0]
    assert sorted(text.get_text() for text in ax.get_legend().get_texts()) == [
        "torch (1234 tokens/s)", "tritonrnn (Triton interpreter: not a speed measurement)"]
    ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_corpus_is_real_text():
    text = load_example("char_rnn").stdlib_corpus()
    assert len(text) > 200_000
    assert "Return" in text


@pytest.mark.parametrize("example, argv, message", [
    ("char_rnn", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("word_lm", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("dp_char_rnn", ["--batch", "-2"], "--batch must be at least 1, got -2"),
    ("char_rnn", ["--out-dir", "{file}/results", "--steps", "1", "--seq-len", "4", "--batch", "2", "--hidden", "8",
                  "--sample", "1"], "--out-dir {file}/results: Not a directory"),
    ("dp_char_rnn", ["--out-dir", "{file}", "--steps", "1", "--seq-len", "4", "--batch", "4", "--windows", "64",
                     "--hidden", "8"], "--out-dir {file}: File exists"),
], ids=["char_rnn-steps", "word_lm-batch", "dp_char_rnn-batch", "char_rnn-out_dir", "dp_char_rnn-out_dir"])
def test_examples_refuse_bad_arguments_before_training(tmp_path, example, argv, message):
    """`python examples/X.py` with a count below 1 or an --out-dir that cannot be made: argparse's usage line
    and one error line, status 2, before any training (the folder is made up front, not after training)."""
    file = tmp_path / "a-file"
    file.write_text("")
    argv = [a.replace("{file}", str(file)) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), *argv], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"{example}.py: error: {message.replace('{file}', str(file))}"
    assert "Traceback" not in result.stderr and "step 1" not in result.stderr + result.stdout


def test_char_rnn_labels_a_cpu_run_by_its_backend(monkeypatch):
    """With TRITON_INTERPRET=0 the CPU run is torch's own RNN, not the interpreter."""
    char_rnn = load_example("char_rnn")
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert char_rnn.device_label(cpu) == "cpu (torch's own RNN)"
    if tritonrnn.dispatch._INTERPRETED_KERNELS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert char_rnn.device_label(cpu) == "cpu (interpreter)"
