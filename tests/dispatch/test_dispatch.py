"""The dispatcher (tritonrnn/dispatch.py): `choose`, the one place that decides a recurrence's layout and
config, its memory of what a device refused (`refuse`), and the ops' one fallback loop around it."""
import dataclasses
import json

import pytest
import torch

from conftest import DEVICE, calibration
from tritonrnn import costmodel, dispatch, kernels, ops, selftest
from tritonrnn.kernels import configs
from tritonrnn.kernels import launch
from tritonrnn.kernels.occupancy import ClusterUnavailable, LaunchRefused, Plan

CUDA = torch.device("cuda")


def _shape(seq_len=512, batch=64, hidden=256, dtype="bfloat16", directions=1, direction="forward"):
    return costmodel.Shape(seq_len, batch, hidden, dtype, direction, True, directions)


RESIDENT = Plan(programs_per_group=8, groups=1, batch_tiles=1, resident_capacity=132)  # what the fake GPU plans


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device in name: no shipped tuned table, every persistent plan resident, no cluster launch
    unless a test allows it (the interpreter runs nothing for it: choose only)."""
    monkeypatch.setattr(configs, "tuned", lambda *args: None)
    monkeypatch.setattr(launch, "persistent_plan", lambda *args, **kwargs: RESIDENT)
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: "no clusters on this fake GPU")
    return CUDA


def test_one_step_takes_the_step_kernel():
    choice = dispatch.choose(_shape(seq_len=1))
    assert (choice.layout, choice.config, choice.source, choice.directions) == (
        "stepwise", None, "one step: the step kernel", 1)


def test_a_calibration_file_changes_the_choice(calibration_dir):
    """bf16 H=256 B=64 takes the sequence layout with the assumed 1 us barrier; a GPU measured at a
    100 ns barrier and 50 ns L2 latency makes the persistent layout faster, read at run time by
    dispatch (the interpreter plans for an H100)."""
    assert dispatch.choose(_shape()).layout == "sequence"
    (calibration_dir / "H100.json").write_text(json.dumps(calibration({"barrier_ns": 100, "l2_latency_ns": 50})))
    costmodel._calibration_for.cache_clear()
    choice = dispatch.choose(_shape())
    assert choice.layout == "persistent" and "calibrated on H100" in choice.source
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRITONRNN_CALIBRATION", "0")
        costmodel._calibration_for.cache_clear()
        assert dispatch.choose(_shape()).layout == "sequence"


def test_a_shipped_tuned_config_wins(monkeypatch):
    config = configs.default_config("stepwise", 64, 256)
    monkeypatch.setattr(configs, "tuned", lambda *args: ("stepwise", config))
    choice = dispatch.choose(_shape())
    assert (choice.layout, choice.config, choice.source) == ("stepwise", config, "shipped tuned config")
    assert choice.config_source == "shipped tuned config"
    monkeypatch.setattr(configs, "tuned", lambda *args: None)
    assert dispatch.choose(_shape()).layout == "sequence"


def test_a_tuned_layout_that_failed_its_self_test_or_was_refused_is_not_taken(monkeypatch):
    config = configs.default_config("persistent", 64, 256, torch.bfloat16)
    monkeypatch.setattr(configs, "tuned", lambda *args: ("persistent", config))
    assert dispatch.choose(_shape()).source == "shipped tuned config"
    monkeypatch.setattr(selftest, "usable", lambda layout, *args: layout != "persistent")
    assert dispatch.choose(_shape()).source.startswith("cost model")
    monkeypatch.undo()
    monkeypatch.setattr(configs, "tuned", lambda *args: ("persistent", config))
    with pytest.warns(RuntimeWarning, match="planted"):
        dispatch.refuse(dispatch.Choice("persistent", config, "test"), _shape(), DEVICE, LaunchRefused("planted"))
    assert dispatch.choose(_shape(), DEVICE).source.startswith("cost model")


def test_the_models_config_reaches_the_launcher_on_cuda(fake_gpu, monkeypatch):
    """On a (faked) CUDA device without clusters the choice carries the cost model's persistent config
    (bf16 H = 512: 32 columns, K in 4 chains, not the launcher's default 64), and the persistent choice
    was checked with that config; under the interpreter the layout's default config (None)."""
    checked = []
    monkeypatch.setattr(launch, "persistent_plan",
                        lambda *args, config=None, **kwargs: checked.append(config) or RESIDENT)
    shape = _shape(batch=16, hidden=512)
    choice = dispatch.choose(shape, fake_gpu)
    assert choice.layout == "persistent" and choice.source.startswith("cost model")
    default = configs.default_config("persistent", 16, 512, torch.bfloat16)
    assert configs.config_to_dict(choice.config) != configs.config_to_dict(default)
    assert checked and checked[-1] is not None and configs.config_to_dict(checked[-1]) == configs.config_to_dict(
        choice.config)
    assert choice.config_source == "the cost model's config"
    on_cpu = dispatch.choose(shape, torch.device("cpu"))
    assert on_cpu.layout == "persistent" and on_cpu.config is None and on_cpu.config_source == "default config"


def test_the_stepwise_layout_is_autotuned_on_a_gpu_unless_autotuning_is_off(fake_gpu, monkeypatch):
    shape = _shape(seq_len=1)
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    choice = dispatch.choose(shape, fake_gpu)
    assert choice.config == "autotune" and choice.config_source == "Triton autotuner"
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "0")
    assert dispatch.choose(shape, fake_gpu).config is None


def test_dispatch_takes_the_cluster_only_where_a_cluster_launch_may_run(fake_gpu, monkeypatch):
    """The interpreter never gets the cluster layout (one program at a time); a (faked) CUDA device where
    a cluster launch may be tried does, with the model's config; where it may not (before sm_90) the next
    layout, persistent."""
    shape = _shape(batch=16, hidden=512)
    assert dispatch.choose(shape).layout == "persistent"
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: None)
    choice = dispatch.choose(shape, fake_gpu)
    assert choice.layout == "cluster" and choice.predicted_us < 1.6 and choice.config is not None
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: "sm_80")
    assert dispatch.choose(shape, fake_gpu).layout == "persistent"


def test_a_gpus_plan_is_asked_once_a_shape(fake_gpu, monkeypatch):
    """On a GPU the counter layouts' plan (a compile-cache lookup and driver queries) is asked once per shape
    and config, whatever T (the arrival counters are checked against each call's T); a refusal is
    remembered too."""
    asked = []
    monkeypatch.setattr(launch, "persistent_plan", lambda *args, **kwargs: asked.append(args) or RESIDENT)
    shape = _shape(batch=16, hidden=512)
    layouts = [dispatch.choose(dataclasses.replace(shape, seq_len=t), fake_gpu).layout for t in (512, 7, 512)]
    assert layouts == ["persistent"] * 3 and len(asked) == 1
    assert dispatch.choose(dataclasses.replace(shape, batch=64), fake_gpu).layout == "persistent" and len(asked) == 2
    dispatch.forget_refusals()
    refused = []
    monkeypatch.setattr(launch, "persistent_plan", lambda *args, **kwargs: refused.append(1) or (_ for _ in ()).throw(
        LaunchRefused("planted: not resident")))
    assert [dispatch.choose(shape, fake_gpu).layout for _ in range(2)] == ["stepwise"] * 2 and len(refused) == 1


def test_a_refused_layout_is_not_offered_again_for_that_shape(fake_gpu, monkeypatch):
    """After the device refused a cluster launch of a shape, `choose` takes the next layout for it (and
    `tritonrnn info` names that one) instead of retrying the refused one at every call; other shapes and
    devices are still offered it. One warning per layout and process."""
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: None)
    shape = _shape(batch=16, hidden=512)
    chosen = dispatch.choose(shape, fake_gpu)
    assert chosen.layout == "cluster"
    with pytest.warns(RuntimeWarning, match="planted.*cluster layout is not taken") as seen:
        dispatch.refuse(chosen, shape, fake_gpu, ClusterUnavailable("planted"))
        dispatch.refuse(chosen, shape, fake_gpu, ClusterUnavailable("planted"))
    assert len(seen) == 1
    assert dispatch.choose(shape, fake_gpu).layout == "persistent"
    assert dispatch.choose(dataclasses.replace(shape, hidden=256), fake_gpu).layout == "cluster"
    assert dispatch.choose(shape, torch.device("cuda", 1)).layout == "cluster"
    dispatch.forget_refusals()
    assert dispatch.choose(shape, fake_gpu).layout == "cluster"


def test_a_layout_that_fails_its_self_test_is_not_taken(monkeypatch):
    shape = _shape()
    assert dispatch.choose(shape).layout == "sequence"
    monkeypatch.setattr(selftest, "usable", lambda layout, *args: layout != "sequence")
    assert dispatch.choose(shape).layout == "persistent"


def test_both_directions_take_one_launch_only_on_the_persistent_kernels_layouts(monkeypatch):
    """directions = 2: a layout that runs both directions in one launch (the persistent kernel's) says so
    (Choice.directions = 2); where the model prefers another, each direction takes the layout it takes
    alone (directions = 1): the sequence layout at bf16 H = 256."""
    both = dispatch.choose(_shape(batch=16, hidden=512, directions=2))
    assert (both.layout, both.directions) == ("persistent", 2)
    alone = dispatch.choose(_shape(directions=2))
    assert (alone.layout, alone.directions) == ("sequence", 1)
    assert dispatch.kernel_path(512, 256, torch.bfloat16, 64, directions=2) == "sequence"


def test_the_ops_fall_back_once_per_refusal_and_remember_it(monkeypatch):
    """The ops' one fallback loop: a launch the device refuses is reported to the dispatcher (refuse) and the
    next choice runs in the same call; nothing else catches a refusal (the launchers raise it)."""
    forced = iter([dispatch.Choice("persistent", None, "test"), dispatch.Choice("stepwise", None, "test")])
    refused = []
    monkeypatch.setattr(dispatch, "choose", lambda shape, device: next(forced))
    monkeypatch.setattr(dispatch, "refuse", lambda choice, shape, device, error: refused.append((choice.layout, error)))
    real = kernels.recurrence_forward

    def launcher(*args, layout, **kwargs):
        if layout == "persistent":
            raise LaunchRefused("planted")
        return real(*args, layout=layout, **kwargs)
    monkeypatch.setattr(kernels, "recurrence_forward", launcher)
    xw, h0, w = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 2, 8, dtype=torch.float64), \
        torch.randn(1, 8, 8, dtype=torch.float64)
    out, h_n = ops.recurrence(xw, h0, w, None, False, "tanh", False)
    assert [layout for layout, _ in refused] == ["persistent"] and str(refused[0][1]) == "planted"
    expected, _ = real(xw[0], h0[0], w[0], layout="stepwise")
    assert torch.equal(out[0], expected)


def test_a_cluster_choice_runs_both_directions_in_one_cluster_launch(monkeypatch):
    """The op hands the cluster layout and its config to one launch of both directions."""
    config = configs.default_config("persistent", 16, 32, torch.float64)
    seen = []
    monkeypatch.setattr(dispatch, "choose", lambda shape, device: dispatch.Choice("cluster", config, "test",
                                                                                  directions=shape.directions))
    monkeypatch.setattr(kernels, "recurrence_forward",
                        lambda xw, h0, w_hh, **kwargs: seen.append((xw.shape, kwargs)) or (xw.clone(), h0.clone()))
    xw, h0, w = torch.zeros(2, 3, 2, 32, dtype=torch.float64), torch.zeros(2, 2, 32, dtype=torch.float64), \
        torch.zeros(2, 32, 32, dtype=torch.float64)
    ops.recurrence(xw, h0, w, None, False, "tanh", True)
    assert len(seen) == 1 and seen[0][0] == (2, 3, 2, 32)
    assert seen[0][1]["layout"] == "cluster" and seen[0][1]["config"] is config


def test_describe_names_the_choice_once_per_direction(monkeypatch):
    calls = []
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose",
                        lambda shape, device=dispatch.CPU: calls.append(shape) or real(shape, device))
    text = dispatch.describe(512, 256, torch.bfloat16, DEVICE, 64)
    assert [s.direction for s in calls] == ["forward", "backward"]
    assert text.startswith("forward: sequence path (rnn_sequence_kernel") and "\n  backward: " in text
