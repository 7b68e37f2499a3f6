"""The tuner with a stubbed timer and for real (interpreted), its candidates, its result lines and command,
and the lookup of the tuned configs it writes (kernels/configs.py)."""
import json

import pytest
import torch

from conftest import ON_GPU
from tritonrnn import dispatch
from tritonrnn.kernels import configs
from tritonrnn.perf import measure, tune


class _Tagged:
    def __init__(self, direction, path, config):
        self.key = (direction, path, tuple(sorted(config.kwargs.items())), config.num_warps)

    def __call__(self):  # the output the candidates are checked with; "wrong" ones differ
        return torch.full((2,), 9.0 if self.key[1] == "persistent" else 1.0)


def test_tune_writes_only_winners_that_beat_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(tune, "recurrence_fn",
                        lambda problem, direction, path, config: _Tagged(direction, path, config))
    defaults = {}

    def stub_timer(fn):
        direction, path, kwargs, warps = fn.key
        default_path, default_config = tune.default_choice(64, 16, torch.float32)
        is_default = (path, kwargs, warps) == (default_path, tuple(sorted(default_config.kwargs.items())),
                                               default_config.num_warps)
        if is_default:
            defaults[direction] = True
            return {"median_ms": 1.0}
        if direction == "forward" and path == "stepwise" and warps == 8 and dict(kwargs)["BLOCK_N"] == 32:
            return {"median_ms": 0.5}  # a clear winner
        if direction == "backward" and path == "sequence":
            return {"median_ms": 0.99}  # within the margin: not written
        return {"median_ms": 2.0}

    (tmp_path / "cpu.json").write_text(json.dumps({"gpu": "cpu", "entries": {
        "float32/H64/B16/backward": {"path": "stepwise", "config": {}}}}))  # a stale winner
    timed = []
    timer = lambda fn: (timed.append(fn.key[1]), stub_timer(fn))[1]  # noqa: E731
    outcome = tune.tune([("float32", 64, 16), ("float32", 64, 9)], timer, torch.device("cpu"),
                        command="test", directory=tmp_path)
    assert "persistent" not in timed  # wrong outputs are never timed
    assert defaults == {"forward": True, "backward": True}
    table = json.loads(outcome["path"].read_text())
    assert set(table["entries"]) == {"float32/H64/B16/forward"}  # B=9 and B=16 share the bucket
    entry = table["entries"]["float32/H64/B16/forward"]
    assert entry["path"] == "stepwise" and entry["config"]["num_warps"] == 8 and entry["time_ms"] == 0.5
    assert table["command"] == "test"


def test_tune_confirms_a_winner_against_the_default_before_writing(monkeypatch, tmp_path):
    """A candidate that was fast once (noise) is re-timed with the default, interleaved, and loses;
    a real winner stays fast in every round and is written."""
    monkeypatch.setattr(tune, "recurrence_fn",
                        lambda problem, direction, path, config: _Tagged(direction, path, config))
    default_path, default_config = tune.default_choice(64, 16, torch.float32)
    default_key = (default_path, tuple(sorted(default_config.kwargs.items())), default_config.num_warps)
    seen, calls = {}, []

    def stub_timer(fn):
        direction, path, kwargs, warps = fn.key
        calls.append("default" if (path, kwargs, warps) == default_key else (path, kwargs, warps))
        if calls[-1] == "default":
            return {"median_ms": 1.0}
        if path == "stepwise" and warps == 8 and dict(kwargs)["BLOCK_N"] == 32:
            seen[fn.key] = seen.get(fn.key, 0) + 1
            if direction == "forward":
                return {"median_ms": 0.5}  # a real winner
            return {"median_ms": 0.5 if seen[fn.key] == 1 else 1.0}  # lucky once, then as slow as the default
        return {"median_ms": 2.0}

    outcome = tune.tune([("float32", 64, 16)], stub_timer, torch.device("cpu"), directory=tmp_path)
    forward, backward = outcome["results"]
    assert forward["written"] and forward["best"]["time_ms"] == 0.5 and forward["default_ms"] == 1.0
    assert not backward["written"] and backward["best"]["time_ms"] == 1.0  # the confirmed time, not the lucky one
    assert set(json.loads(outcome["path"].read_text())["entries"]) == {"float32/H64/B16/forward"}
    # Each confirmation alternates the default and the winner, CONFIRM_ROUNDS times, after the search.
    rounds = 2 * tune.CONFIRM_ROUNDS
    for confirmation in (calls[len(calls) // 2 - rounds:len(calls) // 2], calls[-rounds:]):
        assert confirmation[0::2] == ["default"] * tune.CONFIRM_ROUNDS
        assert len(set(confirmation[1::2])) == 1 and confirmation[1] != "default"


def test_tune_runs_every_candidate_for_real(tmp_path):
    """No stubs: every candidate of a tiny shape runs (interpreted here), is checked and timed."""
    timed = []

    def timer(fn):
        timed.append(fn)
        return measure.wall_timer(fn, reps=1)

    device = torch.device("cuda" if ON_GPU else "cpu")
    outcome = tune.tune([("float32", 20, 3)], timer, device, directory=tmp_path, seq_len=3)
    results = {r["key"].rsplit("/", 1)[1]: r for r in outcome["results"]}
    assert set(results) == {"forward", "backward"}
    for r in results.values():
        assert r["best"] is not None and r["best"]["path"] in configs.TUNED_LAYOUTS
    candidates = len(tune.candidates(20, 3, torch.float32))
    assert {p for p, _ in tune.candidates(20, 3, torch.float32)} == set(configs.TUNED_LAYOUTS)
    # every candidate agreed with the default and was timed; a would-be winner was then confirmed
    assert len(timed) - 2 * (1 + candidates) in {2 * tune.CONFIRM_ROUNDS * k for k in range(3)}
    assert json.loads(outcome["path"].read_text())["entries"].keys() <= {r["key"] for r in results.values()}


def test_tuned_configs_are_used_for_their_gpu(monkeypatch, tmp_path):
    entry = {"path": "stepwise", "config": {"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8,
                                            "num_stages": 3}}
    (tmp_path / "H100.json").write_text(json.dumps({"entries": {"float32/H64/B16/forward": entry}}))
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    configs._tuned_table.cache_clear()
    try:
        cuda = torch.device("cuda")
        layout, config = configs.tuned(torch.float32, 64, 13, "forward", cuda)
        assert layout == "stepwise" and config.num_warps == 8
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "forward") == "stepwise"
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "backward") == "sequence"  # no entry
        assert configs.tuned(torch.float32, 64, 13, "forward", torch.device("cpu")) is None
    finally:
        configs._tuned_table.cache_clear()


def test_tuning_space_fits_the_shape():
    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "H100"
    assert configs.gpu_slug("NVIDIA H200") == "H200"
    for path in configs.TUNED_LAYOUTS:
        for batch, hidden in ((1, 16), (256, 2048), (17, 100)):
            space = configs.tuning_space(path, batch, hidden)
            assert space
            assert all(c.kwargs["BLOCK_B"] <= max(16, configs.batch_bucket(batch)) for c in space)
        default = configs.default_config(path, 64, 128)
        assert default.kwargs["BLOCK_B"] >= configs.MIN_DOT
    pruned = configs.prune_space("sequence")(configs.full_space("sequence"), {"B": 1, "H": 64})
    assert {c.kwargs["BLOCK_B"] for c in pruned} == {16}


def test_tune_offers_only_configs_that_load_at_the_layers_precision():
    """fp32's sequence path cannot hold W_hh in shared memory at H = 200; bf16's can."""
    assert "sequence" not in {p for p, _ in tune.candidates(200, 16, torch.float32)}
    assert "sequence" in {p for p, _ in tune.candidates(200, 16, torch.bfloat16)}
    budget = configs.SHARED_MEMORY_BUDGET
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for path, config in tune.candidates(200, 16, dtype):
            assert configs.shared_memory_bytes(path, config, 200, dtype, True) <= budget, (path, config)


def test_tune_result_lines():
    result = {"key": "float32-H256-B16-forward", "default_ms": 1.23456, "written": True,
              "best": {"time_ms": 0.98765, "path": "persistent", "config": {"BLOCK_B": 16}}}
    assert tune.result_line(result) == ("float32-H256-B16-forward         default 1.235 ms, best 0.988 ms "
                                        "persistent {'BLOCK_B': 16} -> written")
    assert tune.result_line(dict(result, written=False)).endswith("-> default kept")
    assert tune.result_line(dict(result, best=None)) == "float32-H256-B16-forward         no candidate ran"


def test_tune_command_needs_a_gpu_before_reading_its_shapes(monkeypatch):
    from tritonrnn.perf import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        tune.command("standard", ["not-a-shape"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match="bad shape 'not-a-shape'"):
        tune.command("standard", ["not-a-shape"])
