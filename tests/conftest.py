"""Shared fixtures: the device under test, the tolerance table, NaN-poisoned kernel outputs.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before any module
defining @triton.jit kernels is imported: hence the environment variable at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # The self-test gate (tritonrnn.selftest) is off under the interpreter unless asked; tests that fake
    # a CUDA device trust every layout too (tests/dispatch/test_selftest.py turns it on where it tests it).
    os.environ.setdefault("TRITONRNN_SELFTEST", "0")
# Triton's autotuner would tune every new shape of the suite; one GPU test turns it back on.
os.environ.setdefault("TRITONRNN_AUTOTUNE", "0")
# cuBLAS is deterministic only with a fixed workspace (torch.use_deterministic_algorithms asks for it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
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


def installed_copy(tmp_path: Path) -> Path:
    """The package as an install lays it out (tritonrnn/ with kernels/ and perf/ inside, pyproject's
    package-dir), copied into tmp_path: Python started there imports this copy."""
    import shutil
    ignore = shutil.ignore_patterns("__pycache__", "results", "smoke")
    shutil.copytree(ROOT / "tritonrnn", tmp_path / "tritonrnn", ignore=ignore)
    for folder in ("kernels", "perf"):
        shutil.copytree(ROOT / folder, tmp_path / "tritonrnn" / folder, ignore=ignore)
    return tmp_path


def mutated_checkout(tmp_path: Path, path: str, old: str, new: str) -> Path:
    """installed_copy with `old` replaced by `new` (once) in the checkout's file `path` (e.g.
    "kernels/persistent.py"): a mutant for tests that a check catches a planted bug (run Python there with
    cwd=tmp_path)."""
    installed_copy(tmp_path)
    target = tmp_path / (path if path.startswith("tritonrnn/") else f"tritonrnn/{path}")
    text = target.read_text()
    assert text.count(old) == 1, f"the mutation's anchor is not once in {path}: {old!r}"
    target.write_text(text.replace(old, new))
    return tmp_path


def offline_compile(script: str, argument, cwd: Path = ROOT):
    """What `script` prints (JSON), run with `argument` as JSON in a subprocess without TRITON_INTERPRET (the
    compiler needs the real @triton.jit objects) in the checkout at `cwd`; skips where this Triton has no
    bundled NVIDIA toolchain."""
    import json
    from tritonrnn.perf import static
    if not static.available():
        pytest.skip("this triton has no bundled NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(argument)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


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
TESTS = Path(__file__).resolve().parent
# A results file of every provider and mode (tests/fixtures/make_results_fixture.py writes it).
RESULTS_FIXTURE = TESTS / "fixtures" / "results_fixture.json"


def load_example(name: str):
    """Import examples/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_test_module(relative: str):
    """The test module tests/<relative> under its file name, the name pytest's default import mode gives it:
    the one pytest imported if it collected it, else imported here (whichever folder was collected first)."""
    path = TESTS / relative
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    module = sys.modules[path.stem]
    assert Path(module.__file__).resolve() == path, f"another module is named {path.stem}: {module.__file__}"
    return module


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built into tmp_path (skips the test without setuptools)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed")
    source = tmp_path / "src"  # build from a copy: setuptools leaves build/ in the tree it builds
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "tritonrnn", "kernels", "perf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tritonrnn-*.whl")
    return wheel


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu (pyproject.toml's markers) skip where no CUDA GPU is: `-m gpu` selects them all. On a
    GPU they run first, in their order, so that a run cut short (perf/device_check.sh's time limit) has them."""
    if ON_GPU:
        items.sort(key=lambda item: item.get_closest_marker("gpu") is None)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


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
