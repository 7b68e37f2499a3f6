"""The kernels install as tritonrnn.kernels, never as a top-level module named `kernels`."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tritonrnn.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_subpackage():
    assert tritonrnn.kernels.__name__ == "tritonrnn.kernels"
    assert Path(tritonrnn.kernels.__file__).parent.name == "kernels"


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


@pytest.mark.slow
def test_wheel_contains_kernels_under_tritonrnn(tmp_path):
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    assert "tritonrnn/kernels/sequence.py" in names
    assert "tritonrnn/kernels/step.py" in names
    assert "tritonrnn/perf/bench.py" in names and "tritonrnn/perf/device_check.sh" not in names
    assert not any(name.startswith(("kernels/", "perf/")) for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)
