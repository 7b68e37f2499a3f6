"""Shared fixtures: the device under test, the tolerance table, NaN-poisoned kernel outputs.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before any module
defining @triton.jit kernels is imported: hence the environment variable at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # The self-test gate (tritonrnn.selftest) is off under the interpreter unless asked; tests that fake
    # a CUDA device trust every layout too (tests/test_selftest.py turns it on where it tests it).
    os.environ.setdefault("TRITONRNN_SELFTEST", "0")
# Triton's autotuner would tune every new shape of the suite; one GPU test turns it back on.
os.environ.setdefault("TRITONRNN_AUTOTUNE", "0")
# cuBLAS is deterministic only with a fixed workspace (torch.use_deterministic_algorithms asks for it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tritonrnn import dispatch  # noqa: E402
from tritonrnn.kernels import launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# fp16/bf16 numerics are only meaningful on a GPU: the interpreter mishandles bf16.
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])

# Errors against a float64 reference, relative to the reference's largest magnitude:
# |actual - expected| <= atol + rtol * max|expected|, element-wise.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare against a float64 reference with the tolerance of `dtype`; NaN always fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not actual.isnan().any(), f"{name}: NaN (an output element was never written)"
    atol, rtol = TOLERANCE[dtype]
    if not expected.numel():  # an empty batch: the shapes were the comparison
        return
    bound = atol + rtol * expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g} ({dtype})"


ROOT = Path(__file__).resolve().parents[1]


def mutated_checkout(tmp_path: Path, path: str, old: str, new: str) -> Path:
    """A copy of the checkout's packages in tmp_path with `old` replaced by `new` in `path` (once): a mutant
    for tests that a check catches a planted bug (run Python there with cwd=tmp_path)."""
    import shutil
    for folder in ("tritonrnn", "kernels", "perf"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    text = (tmp_path / path).read_text()
    assert text.count(old) == 1, f"the mutation's anchor is not once in {path}: {old!r}"
    (tmp_path / path).write_text(text.replace(old, new))
    return tmp_path


def force_layout(monkeypatch, layout: str, config=None) -> None:
    """Pin the ops' run-time choice (dispatch.choose) to `layout` with `config` (None: its default; both
    directions in one launch where the layout runs them so)."""
    from tritonrnn.kernels.configs import GROUPED

    def forced(shape, device=None):
        return dispatch.Choice(layout, config, "forced by the test",
                               directions=shape.directions if layout in GROUPED else 1)
    monkeypatch.setattr(dispatch, "choose", forced)


@pytest.fixture
def calibration_dir(tmp_path, monkeypatch):
    """Calibration files read from tmp_path (none there unless a test writes one)."""
    from tritonrnn import costmodel
    monkeypatch.setattr(costmodel, "CALIBRATION_DIR", tmp_path)
    costmodel._calibration_for.cache_clear()
    yield tmp_path
    costmodel._calibration_for.cache_clear()


def calibration(constants, layout_scale=None) -> dict:
    """A calibration document (kernels/calibration/README.md) with these constants."""
    from tritonrnn import costmodel
    return {"schema": costmodel.CALIBRATION_SCHEMA, "constants": constants, "layout_scale": layout_scale or {}}


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so an element a kernel fails to write fails."""
    monkeypatch.setattr(launch, "_empty_like", lambda t: torch.full_like(t, float("nan")))


@pytest.fixture(autouse=True)
def no_refusals():
    """Each test starts with a dispatcher that remembers no refused layout (dispatch.refuse)."""
    dispatch.forget_refusals()
    yield
    dispatch.forget_refusals()


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 tests check IEEE fp32; TF32 (cuDNN's default for RNNs) has its own GPU test."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def device():
    return DEVICE
