"""The kernels install as tritonrnn.kernels, never as a top-level module named `kernels`."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tritonrnn.kernels
from conftest import build_wheel, installed_copy

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_import_as_subpackage():
    assert tritonrnn.kernels.__name__ == "tritonrnn.kernels"
    assert Path(tritonrnn.kernels.__file__).parent.name == "kernels"


@pytest.mark.slow
def test_wheel_contains_kernels_under_tritonrnn(tmp_path):
    wheel = zipfile.ZipFile(build_wheel(tmp_path))
    names = wheel.namelist()
    assert "tritonrnn/kernels/sequence.py" in names
    assert "tritonrnn/kernels/step.py" in names
    assert "tritonrnn/perf/bench.py" in names and "tritonrnn/perf/device_check.sh" not in names
    assert not any(name.startswith(("kernels/", "perf/")) for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    assert f"\nVersion: {tritonrnn.__version__}\n" in wheel.read(metadata).decode()


def test_an_installed_layout_imports_as_it_stands(tmp_path):
    """The package laid out as an install lays it out (kernels/ and perf/ inside tritonrnn/) imports from where
    it stands, whatever else is installed: what the mutation tests run (conftest.installed_copy)."""
    installed_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import tritonrnn, tritonrnn.kernels.output, tritonrnn.perf.report\n"
            "for m in (tritonrnn, tritonrnn.kernels, tritonrnn.perf): print(m.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [Path(p) for p in result.stdout.split()] == [tmp_path / "tritonrnn" / "__init__.py",
                                                         tmp_path / "tritonrnn" / "kernels" / "__init__.py",
                                                         tmp_path / "tritonrnn" / "perf" / "__init__.py"]


def test_a_checkout_runs_installed_and_says_so_otherwise(tmp_path):
    """A checkout's kernels/ and perf/ are found only by installing it (docs/DESIGN.md D24: no trick). A copy
    of this checkout run from its root, while this one is installed, imports its own tritonrnn/ but would
    get the installed kernels: it refuses with one line naming both and the fix, instead of running a mix.
    Without any install of the kernels it says to install them."""
    if Path(tritonrnn.kernels.__file__).resolve().parent != (ROOT / "kernels").resolve():
        pytest.skip("the tests run from another install than this checkout's own")
    for name in ("pyproject.toml", "tritonrnn", "kernels", "perf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                              if (ROOT / name).is_dir() else {}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import tritonrnn"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert f"tritonrnn comes from the checkout {tmp_path}" in result.stderr and "pip install -e ." in result.stderr
    assert "(most likely due to a circular import)" not in result.stderr
    isolated = ("import sys; sys.path.insert(0, '.'); "
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; import tritonrnn")
    result = subprocess.run([sys.executable, "-I", "-c", isolated], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "tritonrnn.kernels is not installed" in result.stderr, result.stderr[-2000:]


def _imports(path: Path) -> set:
    """Every module a file imports, at its top or inside functions (relative imports resolved in tritonrnn)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "tritonrnn" + (f".{base}" if base else "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_numerics_sit_below_dispatch_and_functional():
    """One direction of imports: numerics imports nothing of tritonrnn; dispatch only numerics and the kernels
    (it used to import the TF32 setting from functional, which imports dispatch)."""
    assert not {n for n in _imports(ROOT / "tritonrnn" / "numerics.py") if n.startswith("tritonrnn")}
    above = {"tritonrnn.functional", "tritonrnn.ops", "tritonrnn.loss", "tritonrnn.modules", "tritonrnn.lm"}
    assert not _imports(ROOT / "tritonrnn" / "dispatch.py") & above
    from tritonrnn import dispatch, functional, numerics

    assert functional.allow_tf32 is numerics.allow_tf32 and dispatch.numerics is numerics


def test_what_runs_write_into_a_checkout_is_ignored_by_git():
    """Example plots and the rendered report do not show up as untracked files after a run."""
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    paths = ["examples/results/char_rnn_loss.png", "perf/REPORT.md", "perf/plots/speedup_heatmap.png"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths


def test_one_version_string():
    """pyproject.toml holds the version; tritonrnn.__version__, `tritonrnn --version`, the README and
    perf/NOTES.md's newest entry say the same."""
    import re

    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert tritonrnn.__version__ == version
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.cli", "--version"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == f"tritonrnn {version}", result.stderr
    assert f"This is tritonrnn {version} " in (ROOT / "README.md").read_text()
    headings = re.findall(r"^## v(\d[\d.]*)\b", (ROOT / "perf" / "NOTES.md").read_text(), re.M)
    assert headings[-1] == version
