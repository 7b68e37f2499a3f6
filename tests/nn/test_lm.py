"""tritonrnn.ElmanLM against the same model built from torch.nn (TorchElmanLM: nn.Embedding +
nn.RNN + nn.Linear and F.cross_entropy): state_dict both ways, the loss and gradients, the final state across calls,
and the same training curve from the same seed."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonrnn
from conftest import DEVICE, assert_close, load_example
from tritonrnn.kernels import output
from tritonrnn.lm import TorchElmanLM

V, H = 13, 10


CONFIGS = {"embedding": dict(), "one-hot-2-layers-relu": dict(embedding=False, num_layers=2, nonlinearity="relu")}


def _pair(config, seed=0):
    kwargs = dict(CONFIGS[config], device=DEVICE, dtype=torch.float64)
    torch.manual_seed(seed)
    ours = tritonrnn.ElmanLM(V, H, **kwargs)
    torch.manual_seed(seed)
    oracle = TorchElmanLM(V, H, **kwargs)
    return ours, oracle


def _tokens(T, B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (T + 1, B), generator=g).to(DEVICE)


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_and_same_init_from_same_seed(config):
    ours, oracle = _pair(config)
    assert type(ours.rnn) is tritonrnn.RNN and type(oracle.rnn) is nn.RNN
    assert list(ours.state_dict()) == list(oracle.state_dict())
    for key, value in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_loads_both_ways(config):
    ours, oracle = _pair(config, seed=1)
    _, other = _pair(config, seed=2)
    ours.load_state_dict(other.state_dict())  # torch.nn -> ElmanLM
    oracle.load_state_dict(tritonrnn.ElmanLM(V, H, **CONFIGS[config], dtype=torch.float64).state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    tokens = _tokens(5, 3, seed=3)
    ours.load_state_dict(oracle.state_dict())  # ElmanLM <- torch.nn, then compare the models
    assert_close(ours(tokens[:-1], tokens[1:]), oracle(tokens[:-1], tokens[1:]), torch.float64)


@pytest.mark.parametrize("config", CONFIGS)
def test_loss_gradients_and_state_across_calls(config, monkeypatch):
    """Two consecutive windows, the second starting from the first's detached final state
    (truncated BPTT): losses, h_n and every parameter gradient as torch's; the fused kernel ran."""
    launches = []
    launch = output.cross_entropy_chunk
    monkeypatch.setattr(output, "cross_entropy_chunk", lambda *a, **k: launches.append(1) or launch(*a, **k))
    ours, oracle = _pair(config, seed=4)
    tokens = _tokens(9, 3, seed=5)
    state = {"ours": None, "oracle": None}
    for window in (tokens[:5], tokens[4:]):
        loss, h_n = ours(window[:-1], window[1:], state["ours"], return_state=True)
        ref, ref_h_n = oracle(window[:-1], window[1:], state["oracle"], return_state=True)
        ours.zero_grad()
        oracle.zero_grad()
        loss.backward()
        ref.backward()
        assert_close(loss, ref, torch.float64, "loss")
        assert_close(h_n, ref_h_n, torch.float64, "h_n")
        for (name, p), q in zip(ours.named_parameters(), oracle.parameters(), strict=True):
            assert_close(p.grad, q.grad, torch.float64, name)
        state = {"ours": h_n.detach(), "oracle": ref_h_n.detach()}
    assert len(launches) == 2


def test_trains_to_the_same_loss_curve_as_torch():
    """Same seed, same batches (sequences that count modulo V), Adam: the loss curves agree to
    float64 round-off."""
    ours, oracle = _pair("embedding", seed=6)
    curves = []
    for model in (ours, oracle):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        batches = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(5):
            offsets = torch.randint(0, V, (4,), generator=batches)
            tokens = ((offsets + torch.arange(7)[:, None]) % V).to(DEVICE)  # counting: learnable
            loss = model(tokens[:-1], tokens[1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0] - 0.1  # it learns
    assert_close(curves[0], curves[1], torch.float64, "loss curve")


def test_batch_first_sum_none_and_logits():
    torch.manual_seed(8)
    model = tritonrnn.ElmanLM(V, H, batch_first=True, reduction="sum", ignore_index=0, device=DEVICE,
                              dtype=torch.float64)
    tokens = _tokens(6, 2, seed=9).T  # [B, T + 1]
    logits, _ = model.logits(tokens[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="sum", ignore_index=0)
    assert logits.shape == (2, 6, V)
    assert_close(model(tokens[:, :-1], tokens[:, 1:]), expected, torch.float64)
    model.reduction = "none"
    per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=0)
    assert_close(model(tokens[:, :-1], tokens[:, 1:]), per_token, torch.float64)  # [B, T], as the targets


def test_word_lm_example(tmp_path):
    """examples/word_lm.py: the fused and unfused output layers give the same losses, and the fused
    one's peak memory is below the unfused one's by more than all the logits."""
    summary = load_example("word_lm").main(["--vocab", "3000", "--steps", "2", "--seq-len", "16", "--batch", "48",
                                            "--hidden", "32", "--files", "60", "--out-dir", str(tmp_path)])
    unfused, fused = summary["results"]
    assert summary["vocab_size"] == 3000
    assert summary["max_loss_difference"] < 1e-4
    assert unfused["losses"][0] > 7.0  # ~ln(3000): a real corpus, a real model
    assert unfused["peak_memory_bytes"] - fused["peak_memory_bytes"] > summary["logits_bytes"]
    assert (tmp_path / "word_lm_cpu.json").exists() or summary["device"].startswith("cuda")


def test_char_rnn_example_trains_elman_lm():
    """examples/char_rnn.py: the tritonrnn backend is ElmanLM, the torch one the torch.nn network,
    with the same weights."""
    char_rnn = load_example("char_rnn")
    args = char_rnn.argparse.Namespace(seed=0, hidden=12, layers=2)
    ours, oracle = (char_rnn.char_rnn(backend, 7, args, DEVICE) for backend in ("tritonrnn", "torch"))
    assert type(ours) is tritonrnn.ElmanLM and type(oracle) is TorchElmanLM and type(oracle.rnn) is nn.RNN
    for key, value in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


README = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())


def test_logits_return_the_logits_and_the_state_as_the_readme_says():
    ours, _ = _pair("embedding")
    tokens = _tokens(5, 3, seed=7)[:-1]  # [T, B]
    logits, h_n = ours.logits(tokens)
    assert logits.shape == (5, 3, V) and h_n.shape == (1, 3, H)
    assert "`logits(input, hx=None)` returns `(logits, h_n)`" in README


def test_dropout_masks_are_torchs_on_padded_input_not_on_packed_and_the_readme_says_so():
    """Same seed, same masks as torch.nn.RNN on padded input; on packed input tritonrnn drops on the padded
    tensor, so the masks (and a loss curve with dropout) differ: the README must not claim otherwise."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    ours = tritonrnn.RNN(3, 4, num_layers=2, dropout=0.5, device=DEVICE, dtype=torch.float64)
    theirs = nn.RNN(3, 4, num_layers=2, dropout=0.5, device=DEVICE, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, device=DEVICE, dtype=torch.float64)
    same = []
    for inputs in (x, pack_padded_sequence(x, torch.tensor([5, 3]))):
        torch.manual_seed(1)
        a = ours(inputs)[1]
        torch.manual_seed(1)
        same.append(torch.allclose(a, theirs(inputs)[1]))
    assert same == [True, False] or DEVICE.type == "cuda"  # cuDNN's masks are its own
    assert "With dropout and `PackedSequence` input the dropout masks differ from torch.nn's" in README
