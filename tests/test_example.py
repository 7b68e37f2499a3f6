"""examples/char_rnn.py: a few training steps with both backends, whose losses must coincide."""
import json

import tritonrnn
from conftest import DEVICE, load_example


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
