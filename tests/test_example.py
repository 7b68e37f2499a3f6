"""examples/char_rnn.py: a few training steps with both backends, whose losses must coincide."""
import json

from conftest import load_example


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
    assert json.loads(png.with_suffix(".json").read_text())["results"][0]["tokens_per_second"] > 0


def test_corpus_is_real_text():
    text = load_example("char_rnn").stdlib_corpus()
    assert len(text) > 200_000
    assert "Return" in text
