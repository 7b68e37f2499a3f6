"""The command line: `tritonrnn info` (versions, device, which path a shape takes), the conventions
of every command (usage errors, help, --version) and where output goes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ON_GPU, build_wheel
from conftest import RESULTS_FIXTURE as FIXTURE
from tritonrnn import cli, kernel_path, perf


def test_info_reports_versions_backend_and_path(capsys):
    assert cli.main(["info", "--hidden-size", "64", "--seq-len", "32", "--dtype", "float32"]) == 0
    text = capsys.readouterr().out
    assert f"torch     {torch.__version__}" in text
    assert "triton" in text
    expected_backend = "triton" if ON_GPU else "triton-interpreter"
    assert f"backend on {'cuda' if ON_GPU else 'cpu'}: {expected_backend}" in text
    assert "forward: sequence path" in text and "backward: sequence path" in text


def test_info_names_the_stepwise_path_for_large_hidden(capsys):
    cli.main(["info", "--hidden-size", "4096", "--seq-len", "16"])
    assert "forward: stepwise path" in capsys.readouterr().out
    assert kernel_path(16, 4096, torch.float32) == "stepwise"
    assert kernel_path(1, 32, torch.float32) == "stepwise"  # one step: the step kernel
    assert kernel_path(16, 32, torch.float32) == "sequence"


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "tritonrnn"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tritonrnn.cli"]
    result = subprocess.run(command + ["info"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("tritonrnn ")


# The command line's conventions: one line and exit status 2 for a usage error, no traceback unless
# --debug; help for every option; output where the user can write it.
ROOT = Path(__file__).resolve().parents[2]


def _fails_with(argv, capsys, expected: str, status: int = 2) -> str:
    """main(argv) exits with `status` and prints one line to stderr holding `expected`."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    assert expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    return err


def test_version(capsys):
    import tritonrnn

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"tritonrnn {tritonrnn.__version__}"


@pytest.mark.parametrize("option", ["--hidden-size", "--batch", "--seq-len"])
@pytest.mark.parametrize("value", ["-3", "0", "x"])
def test_info_rejects_sizes_that_are_not_positive(option, value, capsys):
    _fails_with(["info", option, value], capsys, f"argument {option}:")


def test_every_option_has_help():
    import argparse

    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in [("tritonrnn", parser), *commands.choices.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings} has no help"
    assert {a.dest for a in commands._choices_actions} == set(commands.choices)
    assert all(a.help for a in commands._choices_actions)


def test_bench_help_documents_the_smoke_grid(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "smoke: two tiny shapes, to check the harness on the CPU (TRITON_INTERPRET=1)" in out


def test_bench_bad_shape_is_a_usage_error(capsys):
    _fails_with(["bench", "--shapes", "foo"], capsys, "tritonrnn bench: error: bad shape 'foo'")
    _fails_with(["bench", "--shapes", "T8-B0-H16"], capsys, "must be positive")


def test_debug_shows_the_traceback():
    with pytest.raises(cli.UsageError, match="does not exist"):
        cli.main(["report", "--results", "/nonexistent.json", "--debug"])


@pytest.mark.skipif(ON_GPU, reason="the interpreter's refusal; a GPU runs every grid")
def test_bench_under_the_interpreter_refuses_the_big_grids(capsys):
    for grid in ("standard", "quick"):
        _fails_with(["bench", "--grid", grid], capsys, "use --grid smoke")


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")
def test_bench_without_gpu_or_interpreter_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.cli", "bench", "--grid", "smoke"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("tritonrnn bench: error: needs a CUDA GPU; without one, TRITON_INTERPRET=1 "
                                     "with --grid smoke checks the harness on the CPU (not a speed measurement)")
    assert not list(tmp_path.iterdir())


def test_report_bad_files_are_usage_errors(tmp_path, capsys):
    _fails_with(["report", "--results", "/nonexistent.json"], capsys, "results file /nonexistent.json does not exist")
    _fails_with(["report", "--results-dir", "/nonexistent"], capsys, "results directory /nonexistent does not exist")
    (tmp_path / "text.json").write_text("not json")
    _fails_with(["report", "--results", str(tmp_path / "text.json")], capsys, "is not a results file: not JSON")
    (tmp_path / "other.json").write_text('{"rows": []}')
    _fails_with(["report", "--results", str(tmp_path / "other.json")], capsys, "not a results file of schema")
    (tmp_path / "empty.json").write_text('{"schema": 2, "rows": [{"gpu": "x"}]}')
    _fails_with(["report", "--results", str(tmp_path / "empty.json")], capsys, "rows without the fields")
    assert not (tmp_path / "REPORT.md").exists()


def test_report_console_labels_the_fixture_synthetic(tmp_path, capsys):
    assert cli.main(["report", "--results", str(FIXTURE), "--out-dir", str(tmp_path), "--no-bench"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"rendered {tmp_path / 'REPORT.md'}")
    assert out[1].strip() == "SYNTHETIC ROWS (A TEST FIXTURE), NOT A MEASUREMENT"
    assert "float32   training  3 compared, 0 failed (tritonrnn), 1 failed (cuDNN): geomean" in out[-1]


def test_cpu_run_header_prints_what_is_known():
    from tritonrnn.perf import report

    assert report._measured_on({"gpu": "cpu (x86_64)", "sm_count": None, "driver": None}) == "**cpu (x86_64)**"
    assert report._measured_on({"gpu": "NVIDIA H200", "sm_count": 132, "driver": "570.1"}) == \
        "**NVIDIA H200** (132 SMs, driver 570.1)"


def test_output_goes_to_the_checkout_from_a_checkout_else_the_current_directory(monkeypatch, tmp_path):
    from tritonrnn import perf

    assert perf.in_checkout() and perf.output_dir("results") == ROOT / "perf" / "results"  # an editable install
    installed = tmp_path / "site-packages" / "tritonrnn" / "perf"
    installed.mkdir(parents=True)
    monkeypatch.setattr(perf, "PERF_DIR", installed)
    monkeypatch.chdir(tmp_path)
    assert not perf.in_checkout() and perf.output_dir("results") == tmp_path


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="packaging, checked on the CPU; a GPU run's time goes to the GPU")
def test_installed_copy_writes_to_the_current_directory_not_site_packages(tmp_path):
    """A regular (non-editable) install: report and bench write into the current directory and say so;
    nothing is written into the installed package."""
    wheel = build_wheel(tmp_path / "wheel")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    before = sorted(p.relative_to(target) for p in target.rglob("*") if "__pycache__" not in p.parts)

    def cli_run(*argv):
        result = subprocess.run([sys.executable, "-m", "tritonrnn.cli", *argv], env=env, cwd=work,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    where = subprocess.run([sys.executable, "-c", "import tritonrnn.perf as p; print(p.PERF_DIR)"], env=env,
                           cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == target / "tritonrnn" / "perf"
    out = cli_run("report", "--results", str(FIXTURE), "--no-bench")
    assert f"rendered {work / 'REPORT.md'}" in out and (work / "plots" / "speedup_heatmap.png").exists()
    out = cli_run("bench", "--grid", "smoke", "--providers", "torch-native", "--modes", "inference", "--no-profile")
    (results,) = work.glob("*-smoke.json")
    assert f"results: {results}" in out
    out = cli_run("report", "--no-bench")  # where bench wrote, not the installed package's perf/results
    assert out.startswith(f"skipped 1 CPU run(s), not measurements (the newest: {results})")  # the prediction
    out = cli_run("report", "--no-bench", "--results", str(results))
    assert out.startswith(f"rendered {work / 'REPORT.md'} from {results}")
    after = sorted(p.relative_to(target) for p in target.rglob("*") if "__pycache__" not in p.parts)
    assert after == before


def test_tune_writes_where_asked_and_into_the_checkout_by_default(monkeypatch, tmp_path, capsys):
    from tritonrnn.kernels import configs
    from tritonrnn.perf import tune

    asked = []

    def fake_tune(shapes, timer, device, command="", directory=None):
        asked.append(directory)
        return {"path": directory / "H200.json", "results": []}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune, "tune", fake_tune)
    assert cli.main(["tune", "--shapes", "T8-B2-H16", "--out-dir", str(tmp_path)]) == 0
    assert f"tuned configs: {tmp_path / 'H200.json'} (the launchers read {configs.TUNED_DIR}" in capsys.readouterr().out
    assert cli.main(["tune", "--shapes", "T8-B2-H16"]) == 0
    assert asked == [tmp_path, configs.TUNED_DIR]  # a checkout: where the launchers read them
    assert capsys.readouterr().out.strip() == f"tuned configs: {configs.TUNED_DIR / 'H200.json'}"


def _installed(monkeypatch, tmp_path):
    """This package seen as an installed copy (site-packages, no results of its own), run from tmp_path/work."""
    from tritonrnn import perf

    installed = tmp_path / "site-packages" / "tritonrnn" / "perf"
    installed.mkdir(parents=True)
    monkeypatch.setattr(perf, "PERF_DIR", installed)
    monkeypatch.setattr(perf, "RESULTS_DIR", installed / "results")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_report_of_an_installed_copy_looks_where_bench_writes(monkeypatch, tmp_path, capsys):
    """Installed (not editable), bench writes into the current directory: report renders from there, and
    without results says where it looked, pointing at nothing the installed copy lacks."""
    work = _installed(monkeypatch, tmp_path)
    assert cli.main(["report", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"No results to render in {work} or {tmp_path / 'site-packages/tritonrnn/perf/results'}.")
    assert f"which writes to {work}" in out and "device_check" not in out
    shutil.copy(FIXTURE, work / "20260101T000000-FIXTURE-quick.json")
    assert cli.main(["report", "--no-bench"]) == 0
    assert capsys.readouterr().out.startswith(f"rendered {work / 'REPORT.md'} from "
                                              f"{work / '20260101T000000-FIXTURE-quick.json'}")


@pytest.mark.parametrize("argv", [["bench", "--grid", "smoke"], ["bench", "--output-layer", "16", "--vocab", "8"],
                                  ["tune", "--shapes", "T8-B2-H16"], ["report", "--results", str(FIXTURE)]],
                         ids=["bench", "bench-output-layer", "tune", "report"])
def test_out_dir_that_is_a_file_is_refused_before_any_work(argv, monkeypatch, tmp_path, capsys):
    from tritonrnn.perf import bench, output_layer, report, tune

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    for module, name in ((bench, "run"), (output_layer, "output_layer_rows"), (tune, "tune"), (report, "render")):
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # tune and bench would run
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    for out_dir in (a_file, a_file / "sub"):
        _fails_with([*argv, "--out-dir", str(out_dir)], capsys,
                    f"--out-dir {out_dir}: {a_file} is a file; --out-dir takes a folder")
    assert a_file.read_text() == "{}"


def test_report_names_the_kind_of_path_wanted(tmp_path, capsys):
    _fails_with(["report", "--results", str(tmp_path)], capsys,
                f"results file {tmp_path} is a folder: --results takes files (a folder goes to --results-dir)")
    _fails_with(["report", "--results-dir", str(FIXTURE)], capsys,
                f"results directory {FIXTURE} is a file: --results-dir takes a folder (a file goes to --results)")


@pytest.mark.parametrize("field, value", [("median_ms", "1.5"), ("batch", None), ("tf32", 1), ("kernels", [3])])
def test_results_field_of_the_wrong_type_names_the_file_and_field(field, value, tmp_path, capsys):
    import json

    data = json.loads(FIXTURE.read_text())
    data["rows"][5][field] = value
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(data))
    _fails_with(["report", "--results", str(path), "--out-dir", str(tmp_path)], capsys,
                f"{path}: row 5 ({data['rows'][5]['case']}), field {field!r} is {value!r}, not ")
    assert not (tmp_path / "REPORT.md").exists()


ROOT = Path(__file__).resolve().parents[2]


def _command(*argv, interpret=True, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m tritonrnn.cli ARGV` in a fresh process, on this checkout's code, as a user's shell runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "tritonrnn.cli", *argv], env=env, capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's refusal; a GPU runs these shapes")
def test_bench_under_the_interpreter_refuses_oversize_shapes(tmp_path):
    """One line and status 2 before any work, as --output-layer's refusal (T4096-B256-H2048 was killed by the
    out-of-memory killer at 23.6 GB); test_perf's test_bench_device_under_the_interpreter checks that small
    shapes stay accepted."""
    result = _command("bench", "--shapes", "T16-B16-H64", "T4096-B16-H64", "--out-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "T4096-B16-H64" in result.stderr and "within" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(ON_GPU, reason="a CPU (interpreter) smoke run")
def test_report_after_a_cpu_smoke_bench_renders_the_prediction(tmp_path, monkeypatch, capsys):
    """The README's smoke bench (its profiling pass silent), then `tritonrnn report`: a CPU run is no report's
    source unless asked for with --results or --results-dir (report renders the prediction and says it skipped
    the run); --prediction renders the prediction whatever results exist. A checkout's CPU runs go to perf/smoke/,
    ignored by git, not to perf/results/ (committed GPU results); PREDICTION.md is ignored as REPORT.md is."""
    smoke, out = tmp_path / "smoke", tmp_path / "out"
    result = _command("bench", "--grid", "smoke", "--providers", "torch-native", "--modes", "inference",
                      "--out-dir", str(smoke), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "USDT" not in result.stdout + result.stderr  # torch's profiler's C++ lines, one pair a row
    (run,) = smoke.glob("*-smoke.json")
    assert perf.bench_output_dir() == ROOT / "perf" / "smoke"  # this checkout's default for a CPU run
    work = _installed(monkeypatch, tmp_path)  # report's own folder holds the run (an installed copy's: its cwd)
    shutil.copy(run, work / run.name)
    assert cli.main(["report", "--no-bench"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"skipped 1 CPU run(s), not measurements (the newest: {work / run.name})")
    assert "a PREDICTION" in text and (work / "PREDICTION.md").exists() and not (work / "REPORT.md").exists()
    for asked in (["--results", str(run)], ["--results-dir", str(smoke)]):  # asked for: rendered
        result = _command("report", *asked, "--out-dir", str(out))
        assert result.returncode == 0 and result.stdout.startswith(f"rendered {out / 'REPORT.md'} from {run}")
    result = _command("report", "--prediction", "--out-dir", str(out))
    assert result.returncode == 0 and (out / "PREDICTION.md").exists(), result.stderr[-2000:]
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "perf/smoke/x-smoke.json", "perf/PREDICTION.md"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.split()
        assert ignored == ["perf/smoke/x-smoke.json", "perf/PREDICTION.md"]


def test_output_piped_into_head_ends_quietly():
    """`tritonrnn info --offline h100 --grid standard | head -n 1` (thousands of lines into a closed pipe)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    command = f"{sys.executable} -m tritonrnn.cli info --offline h100 --grid standard | head -n 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.stdout.startswith("offline plan for H100") and result.stdout.count("\n") == 1
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("module", ["static", "output_layer", "plan"])
def test_perf_module_help_prints_help_without_work(module, capsys):
    """`python -m tritonrnn.perf.X --help` prints its usage and exits 0 before any compile (static and
    output_layer compile for minutes otherwise; plan printed nothing)."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"tritonrnn.perf.{module}").main(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m tritonrnn.perf.{module}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", f"tritonrnn.perf.{module}", "--help"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m tritonrnn.perf.{module}")
