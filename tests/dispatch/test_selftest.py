"""The self-test gate (tritonrnn.selftest): a layout proves itself on the device before dispatch takes it.

Under the interpreter the gate is off unless asked (TRITONRNN_SELFTEST=1, set here); a planted broken
layout (a kernel that writes garbage, a launcher that raises) must be refused with one warning while the
layers' answers stay right; verdicts are cached per device and versions.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tritonrnn
from conftest import DEVICE, ON_GPU, assert_close
from tritonrnn import cli, dispatch, selftest
from tritonrnn.kernels import launch, occupancy

pytestmark = pytest.mark.skipif(ON_GPU, reason="plants broken layouts in the interpreter")
ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS_EMPTY_LIKE = launch._empty_like  # before conftest's fixture poisons every output itself


@pytest.fixture(autouse=True)
def gate(monkeypatch, tmp_path):
    """The gate on, its cache in a fresh folder, no verdict remembered from another test."""
    monkeypatch.setenv("TRITONRNN_SELFTEST", "1")
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path / "cache"))
    selftest.reset()
    yield
    selftest.reset()


class Garbage:
    """A stand-in for a @triton.jit kernel that writes 7 into its output (p_out) and nothing else."""

    def __getitem__(self, grid):
        return lambda **kwargs: kwargs["p_out"].fill_(7.0)


def _plant_garbage_sequence(monkeypatch):
    monkeypatch.setitem(launch.KERNELS, "sequence", Garbage())


def _cached(device=DEVICE) -> dict:
    return json.loads(selftest.cache_path(device).read_text())


def test_a_layout_that_writes_garbage_is_refused_once_and_the_layer_stays_right(monkeypatch):
    """H = 16 in fp32 takes the sequence layout here; planted broken, its self-test fails at the first
    call, one warning names it and why, and the layer runs the next layout (stepwise: exact fp32 has no
    persistent one), forward and backward right against float64; later calls warn no more."""
    kernel = launch.KERNELS["sequence"]
    _plant_garbage_sequence(monkeypatch)
    shape = (5, 16, torch.float32, 3)
    oracle = nn.RNN(4, 16).double()
    ours = tritonrnn.RNN(4, 16, dtype=torch.float32)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, h_n = ours(x.float().requires_grad_())
        (out.sum() + h_n.sum()).backward()
        assert dispatch.kernel_path(*shape, allow_tf32=False) == "stepwise"
        ours(x.float())
    messages = [str(w.message) for w in caught if "self-test" in str(w.message)]
    assert len(messages) == 1, messages
    assert "the sequence layout did not pass its self-test" in messages[0] and "float32" in messages[0]
    assert "failed: out at T=4 B=3 H=16" in messages[0] and "max error" in messages[0]
    ref_out, ref_hn = oracle(x)
    (ref_out.sum() + ref_hn.sum()).backward()
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(h_n, ref_hn, torch.float32, "h_n")
    for name, param in ours.named_parameters():
        assert_close(param.grad, dict(oracle.named_parameters())[name].grad, torch.float32, name)
    assert _cached()["verdicts"]["sequence/float32"]["status"] == "failed"
    monkeypatch.setitem(launch.KERNELS, "sequence", kernel)  # repaired, but the verdict stands here
    assert dispatch.kernel_path(*shape, allow_tf32=False) == "stepwise"


def test_the_selftest_poisons_the_outputs_itself(monkeypatch):
    """A kernel that writes nothing leaves NaN, the self-test's own poison (the launchers' outputs are
    plain torch.empty_like outside it), and is refused for it."""
    monkeypatch.setattr(launch, "_empty_like", LAUNCHERS_EMPTY_LIKE)
    monkeypatch.setitem(launch.KERNELS, "sequence", type("Idle", (), {"__getitem__": lambda self, grid: (
        lambda *args, **kwargs: None)})())
    with pytest.warns(RuntimeWarning, match=r"failed: out at T=4 B=3 H=16 with lengths: NaN \(an element never"):
        assert not selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False)
    with launch.checking(1.0):
        assert launch._empty_like(torch.zeros(3)).isnan().all()


@pytest.mark.parametrize("raised, status", [(RuntimeError("planted"), "failed"),
                                            (occupancy.BarrierTimeout("planted wait"), "timed out"),
                                            (occupancy.LaunchRefused("planted refusal"), "refused")])
def test_a_launcher_that_raises_is_refused_with_its_reason(monkeypatch, raised, status):
    """The persistent launch raising: its verdict says how (a refusal is not the next layout's success: the
    launchers never fall back), and the self-test's wait limit reached it."""
    seen = []

    def refuse(args, device, timeout_s):
        seen.append(timeout_s)
        raise raised

    monkeypatch.setattr(launch, "_launch_persistent", refuse)
    reason = f"{status}: (RuntimeError: )?planted"
    with pytest.warns(RuntimeWarning, match=f"the persistent layout did not pass its self-test .*{reason}"):
        assert not selftest.usable("persistent", torch.float64, DEVICE, allow_tf32=False)
    assert seen == [selftest.WAIT_LIMIT_S]
    assert dispatch.kernel_path(8, 100, torch.float64, 5, allow_tf32=False) != "persistent"
    assert _cached()["verdicts"]["persistent/float64"]["status"] == status


def test_a_check_past_its_time_limit_is_refused(monkeypatch):
    monkeypatch.setattr(selftest, "INTERPRETED_TIME_LIMIT_S", 0.0)
    with pytest.warns(RuntimeWarning, match="timed out: its checks took"):
        assert not selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False)


def test_kernels_that_never_finish_are_a_saved_verdict_and_a_clear_error(monkeypatch):
    """On a GPU the layout's kernels are polled (an event) until the time limit: kernels still running
    then (a cluster barrier that never opens cannot be stopped) raise SelfTestHang, after the verdict is
    saved; `tritonrnn selftest` then checks nothing more (the GPU is held) and says so."""
    class Stuck:
        def record_event(self):
            return type("Event", (), {"query": lambda self: False})()

    monkeypatch.setattr(selftest, "TIME_LIMIT_S", 0.01)
    with pytest.raises(selftest.SelfTestHang, match="cluster layout's self-test kernels still ran 0.01 s"):
        selftest._wait("cluster", Stuck(), 0.0)

    def hang(layout, stream, began):
        raise selftest.SelfTestHang("stuck")

    monkeypatch.setattr(selftest, "_wait", hang)
    rows = selftest.run_all(DEVICE, [(torch.float64, False)])
    assert [(r["layout"], r["status"]) for r in rows[1:]] == [
        ("sequence", "timed out"), ("persistent", "not run"), ("streamed", "not run"), ("cluster", "not run")]
    assert "an earlier check hung: stuck" in rows[2]["reason"]
    assert _cached()["verdicts"]["sequence/float64"] == {**_cached()["verdicts"]["sequence/float64"],
                                                         "status": "timed out", "reason": "stuck"}


def test_verdicts_are_cached_on_disk_and_keyed_by_versions(monkeypatch):
    """A verdict is written once, read back by a new process (no check runs), and not used for another
    Triton version; TRITONRNN_CACHE_DIR places the file (else XDG_CACHE_HOME/tritonrnn)."""
    _plant_garbage_sequence(monkeypatch)
    with pytest.warns(RuntimeWarning):
        assert not selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False)
    path = selftest.cache_path(DEVICE)
    assert path.parent == Path(os.environ["TRITONRNN_CACHE_DIR"])
    data = _cached()
    assert data["device"]["gpu"] == "Triton interpreter (CPU)" and data["device"]["triton"]
    assert data["verdicts"]["sequence/float64"]["status"] == "failed"
    selftest.reset()  # a new process: the file only

    def no_check(*args):
        raise AssertionError("a cached verdict must not be checked again")

    monkeypatch.setattr(selftest, "check", no_check)
    with pytest.warns(RuntimeWarning, match="sequence layout did not pass"):
        assert not selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False)
    checked = []
    monkeypatch.setattr(selftest, "check", lambda *args: checked.append(args) or selftest._verdict("passed", "", 0))
    import triton

    monkeypatch.setattr(triton, "__version__", "9.9.9")
    selftest._device_key.cache_clear()  # a new process: the versions read anew
    selftest._cache_path.cache_clear()
    try:
        assert selftest.cache_path(DEVICE) != path
        assert selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False) and len(checked) == 1
    finally:
        selftest._device_key.cache_clear()
        selftest._cache_path.cache_clear()
    monkeypatch.delenv("TRITONRNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert selftest.cache_dir() == Path("/somewhere/tritonrnn")


def test_a_check_that_never_ended_is_a_failed_verdict():
    """A pending verdict left by a process that is gone (it hung or crashed in the check: a cluster
    barrier cannot be timed out) makes the layout unusable; one still running is not judged."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    selftest._write(DEVICE, "sequence/float64", {"status": "pending", "pid": dead.pid, "host": os.uname().nodename,
                                                  "started": "then"})
    with pytest.warns(RuntimeWarning, match="did not finish: its check started at then"):
        assert not selftest.usable("sequence", torch.float64, DEVICE, allow_tf32=False)
    assert _cached()["verdicts"]["sequence/float64"]["status"] == "did not finish"
    assert selftest._alive({"pid": os.getpid(), "host": os.uname().nodename})


def test_the_gate_is_off_with_selftest_0_and_by_default_under_the_interpreter(monkeypatch):
    _plant_garbage_sequence(monkeypatch)
    monkeypatch.setattr(selftest, "check", lambda *args: pytest.fail("the gate is off: no check"))
    monkeypatch.setenv("TRITONRNN_SELFTEST", "0")
    assert selftest.usable("sequence", torch.float32, DEVICE, False)
    assert dispatch.kernel_path(5, 16, torch.float32, 3, allow_tf32=False) == "sequence"
    monkeypatch.delenv("TRITONRNN_SELFTEST")
    assert not selftest.enabled(torch.device("cpu")) and selftest.enabled(torch.device("cuda"))
    assert dispatch.kernel_path(5, 16, torch.float32, 3, allow_tf32=False) == "sequence"
    assert not selftest.cache_path(DEVICE).exists()


def test_selftest_command_prints_every_layout_and_exits_0(monkeypatch, capsys):
    """`tritonrnn selftest --interpreter`: a broken layout is a result (exit 0); no cluster runs under the
    interpreter (one program at a time), which the table says."""
    _plant_garbage_sequence(monkeypatch)
    monkeypatch.setattr(launch, "_launch_persistent", lambda *args: (_ for _ in ()).throw(RuntimeError("planted")))
    assert cli.main(["selftest", "--interpreter", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {(r["layout"], r["dtype"]): r for r in map(json.loads, (line for line in lines if line.startswith("{")))}
    assert rows[("sequence", "float64")]["status"] == rows[("sequence", "float32")]["status"] == "failed"
    assert rows[("persistent", "float64")]["status"] == "failed"
    assert rows[("cluster", "float64")]["status"] == "refused" and "sm_90" in rows[("cluster", "float64")]["reason"]
    assert rows[("stepwise", "all")]["status"] == "reference"
    assert lines[-1].startswith("verdicts cached in ")


def test_selftest_command_exits_2_where_it_cannot_run():
    """No GPU and no interpreter: nothing can run (a usage error, exit 2)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tritonrnn.cli", "selftest"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU; without one, --interpreter" in done.stderr


def test_calibration_runs_the_selftest_first_and_skips_what_failed(monkeypatch, tmp_path, capsys):
    """perf/calibrate.py (the device check's calibration stage): the self-test's table first, in its
    output, calibration.txt and the file; a layout that did not pass is not measured. (GPU faked.)"""
    import triton  # noqa: F401 - calibrate.main imports it

    from tritonrnn.perf import calibrate

    order = []
    rows = [{"layout": "cluster", "dtype": "bfloat16", "status": "failed", "reason": "planted", "seconds": 0.1}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(selftest, "run_all", lambda device: order.append("selftest") or rows)
    monkeypatch.setattr(calibrate, "measure", lambda device, out: order.append("measure") or out.update(
        gpu="NVIDIA H100 80GB HBM3", barrier_ns=700.0, round_trip_ns=1100.0, cells=[]))
    assert calibrate.main([str(tmp_path)]) == 0
    assert order == ["selftest", "measure"]
    text = (tmp_path / "calibration.txt").read_text()
    assert text.startswith("self-test (tritonrnn selftest) on NVIDIA H100 80GB HBM3:\nlayout")
    assert "cluster    bfloat16      failed" in text and "cluster    bfloat16      failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "H100.json").read_text())["selftest"] == rows
    monkeypatch.setattr(selftest, "usable", lambda layout, *args, **kwargs: layout != "cluster")
    assert calibrate._layouts("bfloat16", 1024, torch.device("cuda")) == ["persistent", "streamed", "stepwise"]
    assert "cluster" in calibrate._layouts("bfloat16", 1024)


def test_the_checks_ignore_the_default_device():
    """A default device set by the user (torch.set_default_device, a device context) does not reach the
    checks' float64 inputs and reference: they stay on the CPU."""
    with torch.device("meta"):
        p = selftest._inputs(3, 4, 8, True, 2, seed=0)
        refs = selftest._references(p, 2)
    assert {t.device.type for t in (*p.values(), *refs)} == {"cpu"} and p["xw"].dtype == torch.float64
