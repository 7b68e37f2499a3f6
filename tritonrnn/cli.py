"""The tritonrnn command line: info, selftest, bench, tune, report.

Usage errors (bad arguments, missing or malformed files, no device to run on) print one line and
exit with status 2; any other failure prints one line and exits with 1. `--debug` shows the
traceback instead.
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


class UsageError(Exception):
    """What the user asked for cannot run as asked: one line, exit status 2."""


def _info_offline(args) -> int:
    """What an H100 or H200 would run, from the cost model and the shipped offline sm_90 table: no GPU,
    no compile (works with or without TRITON_INTERPRET)."""
    from tritonrnn.perf import plan

    try:
        if args.grid == "standard":
            rows = _standard_grid_rows(args, plan.grid_plan(args.offline))
        else:
            _shape_defaults(args)
            rows = plan.cells(args.offline, [(args.seq_len, args.batch, args.hidden_size, args.dtype)])
    except ValueError as exc:
        raise UsageError(exc) from None
    plan.show(rows, args.offline, args.json)
    return 0


SHAPE_DEFAULTS = {"hidden_size": 256, "seq_len": 512, "batch": 16, "dtype": "float32"}


def _shape_defaults(args) -> None:
    """info's shape options where not given (None: given or not is what --grid standard needs to know)."""
    for name, value in SHAPE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _standard_grid_rows(args, rows: list) -> list:
    """The standard grid's rows, only those of --hidden-size, --batch and --dtype where given; a value the
    grid does not hold (or another --seq-len than its T) is a usage error, not an ignored option."""
    from tritonrnn.perf.grid import BATCHES, DTYPES, HIDDENS, SEQ_LEN

    for name, option, values in (("seq_len", "--seq-len", (SEQ_LEN,)), ("hidden_size", "--hidden-size", HIDDENS),
                                 ("batch", "--batch", BATCHES), ("dtype", "--dtype", DTYPES)):
        value = getattr(args, name)
        if value is not None and value not in values:
            raise UsageError(f"{option} {value} is not in the standard grid ({', '.join(map(str, values))}); "
                             f"drop --grid standard for one shape")
    key = {"hidden_size": "hidden", "batch": "batch", "dtype": "dtype"}
    return [r for r in rows if all(getattr(args, name) in (None, r[field]) for name, field in key.items())]


def _info(args) -> int:
    import triton

    import tritonrnn
    from tritonrnn import dispatch
    from tritonrnn.dispatch import backend, describe, interpreter_enabled
    from tritonrnn.kernels import toolchain

    if args.offline:
        return _info_offline(args)
    if args.grid or args.json:
        raise UsageError("--grid and --json go with --offline GPU")
    _shape_defaults(args)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"tritonrnn {tritonrnn.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn})")
    print(f"triton    {triton.__version__} ({toolchain.unsupported_message() or 'supported: ' + toolchain.SUPPORTED})")
    print("layouts   " + ", ".join(f"{name} ({why})" if why else name for name, why in toolchain.layouts().items()))
    problem = dispatch.interpreter_enabled() and toolchain.interpreter_problem()
    if problem:
        print(f"interpreter: {problem}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU       {props.name}, {props.multi_processor_count} SMs, "
              f"compute capability {props.major}.{props.minor}")
        device = torch.device("cuda")
    else:
        print("GPU       none")
        device = torch.device("cpu")
    print(f"interpreter (TRITON_INTERPRET=1): {'on' if interpreter_enabled() else 'off'}")
    print(f"backend on {device.type}: {backend(device)}")
    dtype = _DTYPES[args.dtype]
    print(f"layer T={args.seq_len} B={args.batch} H={args.hidden_size} {args.dtype}:\n  "
          f"{describe(args.seq_len, args.hidden_size, dtype, device, args.batch)}")
    return 0


def _selftest(args) -> int:
    """Every layout's self-test on this device, now (tritonrnn.selftest): the table. Exit 0 whenever it
    ran (an unusable layout is a result); 2 where it cannot run (no GPU, no interpreter)."""
    import subprocess

    from tritonrnn import selftest
    from tritonrnn.dispatch import interpreter_enabled

    if args.interpreter and not interpreter_enabled():
        # Triton reads TRITON_INTERPRET when the kernels are defined, at import: a fresh process.
        return subprocess.run([sys.executable, "-m", "tritonrnn.cli", *args.argv],
                              env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode
    if args.interpreter or not torch.cuda.is_available():
        if not interpreter_enabled():
            raise UsageError("needs a CUDA GPU; without one, --interpreter (or TRITON_INTERPRET=1) runs the "
                             "self-test in Triton's CPU interpreter")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    key = selftest.device_key(device)
    print(f"self-test of tritonrnn's layouts on {key['gpu']}: " + ", ".join(
        f"{k} {v}" for k, v in key.items() if k != "gpu"))
    rows = selftest.run_all(device)
    if args.json:
        import json

        for row in rows:
            print(json.dumps(row))
    else:
        print(selftest.table(rows))
    print(f"verdicts cached in {selftest.cache_path(device)}")
    return 0


def _no_autotuning() -> None:
    """Benchmarks measure the shipped tuned configs or the defaults: the autotuner would first
    tune every shape (slow, and not what a timed call runs)."""
    os.environ["TRITONRNN_AUTOTUNE"] = "0"


def _command(argv) -> str:
    return "tritonrnn " + " ".join(argv if argv is not None else sys.argv[1:])


def _cases(args):
    from tritonrnn.perf import grid

    try:
        return grid.select(args.grid, args.shapes, args.dtypes)
    except ValueError as exc:
        raise UsageError(exc) from None


def _bench_device(args, cases) -> torch.device:
    """The device bench runs `cases` on, or a UsageError saying why there is none that makes sense."""
    from tritonrnn.dispatch import interpreter_enabled

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreter_enabled():
        raise UsageError("needs a CUDA GPU; without one, TRITON_INTERPRET=1 with --grid smoke checks the harness "
                         "on the CPU (not a speed measurement)")
    if not args.shapes and args.grid != "smoke":
        raise UsageError(f"--grid {args.grid} under the interpreter (TRITON_INTERPRET=1) would take hours; use "
                         "--grid smoke (or small --shapes) to check the harness on the CPU")
    for case in cases:
        states = case.seq_len * case.batch * case.hidden * case.layers * (1 + case.bidirectional)
        if states > INTERPRETER_MAX_STATES:
            raise UsageError(f"T{case.seq_len}-B{case.batch}-H{case.hidden} x {case.layers} layer(s) x "
                             f"{1 + case.bidirectional} direction(s) under the interpreter would take hours; keep "
                             f"T x B x H x layers x directions within {INTERPRETER_MAX_STATES} (e.g. T64-B16-H128)")
    return torch.device("cpu")


INTERPRETER_MAX_STATES = 1 << 17  # T x B x H x layers x directions the interpreter benchmarks in about a minute


OUTPUT_LAYER_ROWS = (8192, 16384, 32768)
INTERPRETER_MAX_LOGITS = 1 << 22  # rows x vocabulary the interpreter gets through in about a minute


def _bench_output_layer(args) -> int:
    """The fused output layer against F.cross_entropy(F.linear(...)): time and peak memory."""
    from tritonrnn.dispatch import interpreter_enabled
    from tritonrnn.perf import output_layer

    rows = args.output_layer or OUTPUT_LAYER_ROWS
    if not torch.cuda.is_available():
        if not interpreter_enabled():
            raise UsageError("--output-layer needs a CUDA GPU; without one, TRITON_INTERPRET=1 with small sizes "
                             "(e.g. --output-layer 256 --vocab 2048 --hidden 64) checks it on the CPU")
        if max(rows) * args.vocab > INTERPRETER_MAX_LOGITS:
            raise UsageError(f"{max(rows)} rows x {args.vocab} classes under the interpreter would take hours; "
                             f"keep rows x vocabulary within {INTERPRETER_MAX_LOGITS}")
    out_dir = args.out_dir or _bench_out_dir()
    results, path = output_layer.run_to_file(out_dir, args.command_line, dtypes=args.dtypes or ("bfloat16",),
                                             rows=rows, vocab=args.vocab, hidden=args.hidden)
    print(output_layer.format_rows(results))
    failed = [r for r in results if r["status"] != "ok"]
    print(f"results: {path} ({len(results)} rows, {len(failed)} failed)")
    return 1 if failed else 0


def _bench_out_dir() -> Path:
    """Where bench writes by default: perf/results/ (measured GPU results, committed) from a checkout on a GPU;
    a CPU run (the interpreter: a check of the harness, not a measurement) goes to perf/smoke/, ignored by git;
    an installed copy writes into the current directory."""
    from tritonrnn.perf import output_dir

    return output_dir("results" if torch.cuda.is_available() else "smoke")


def _bench(args) -> int:
    from tritonrnn.perf import bench

    if args.output_layer is not None:
        return _bench_output_layer(args)
    cases = _cases(args)
    device = _bench_device(args, cases)
    if not args.autotune:
        _no_autotuning()
    out_dir = args.out_dir or _bench_out_dir()
    results, path = bench.run_to_file(cases, "custom" if args.shapes else args.grid, out_dir, device=device,
                                      modes=args.modes, providers=args.providers, command=args.command_line,
                                      profile=not args.no_profile)
    failed = [r for r in results["rows"] if r["status"] in ("wrong", "error")]
    if results["stopped"]:
        print(f"stopped early: {results['stopped']}", file=sys.stderr)
    print(f"results: {path} ({len(results['rows'])} rows, {len(failed)} wrong or failed"
          f"{'' if results['complete'] else ', interrupted'})")
    return 1 if failed or not results["complete"] else 0


def _tune(args) -> int:
    from tritonrnn.kernels import config as configs
    from tritonrnn.perf import in_checkout, measure, tune

    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA GPU (timings under the interpreter mean nothing)")
    shapes = [(c.dtype, c.hidden, c.batch) for c in _cases(args)]
    directory = args.out_dir or (configs.TUNED_DIR if in_checkout() else Path.cwd())
    outcome = tune.tune(shapes, measure.cuda_timer, torch.device("cuda"), command=args.command_line,
                        directory=directory)
    for r in outcome["results"]:
        best = r["best"]
        verdict = "written" if r["written"] else "default kept"
        print(f"{r['key']:32s} default {r['default_ms']:.3f} ms, best "
              f"{best['time_ms']:.3f} ms {best['path']} {best['config']} -> {verdict}" if best else
              f"{r['key']:32s} no candidate ran")
    note = "" if outcome["path"].parent.resolve() == configs.TUNED_DIR.resolve() else \
        f" (the launchers read {configs.TUNED_DIR}: copy it there to use it)"
    print(f"tuned configs: {outcome['path']}{note}")
    return 0


def _load_results(sources) -> list:
    from tritonrnn.perf import bench

    try:
        return bench.load(sources)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a file that `tritonrnn bench` wrote") from None


def _load_output_layer(sources) -> list:
    from tritonrnn.perf import output_layer

    try:
        return output_layer.load(sources)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a file that `tritonrnn bench --output-layer` wrote") from None


def _check_results_paths(args) -> None:
    """--results takes files, --results-dir a folder: say which kind of path is wanted."""
    for source in args.results:
        if source.is_dir():
            raise UsageError(f"results file {source} is a folder: --results takes files (a folder goes to "
                             f"--results-dir)")
        if not source.is_file():
            raise UsageError(f"results file {source} does not exist")
    folder = args.results_dir
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UsageError(f"results directory {folder} is a file: --results-dir takes a folder (a file goes to "
                         f"--results)")
    if folder is not None and not args.results and not folder.is_dir():
        raise UsageError(f"results directory {folder} does not exist")


def _results_dirs(args) -> list:
    """Where report looks for results: --results-dir, else where bench writes (the checkout's
    perf/results/, or the current directory for an installed copy) and the package's own results."""
    from tritonrnn.perf import RESULTS_DIR, output_dir

    if args.results_dir is not None:
        return [args.results_dir]
    return list(dict.fromkeys([output_dir("results"), RESULTS_DIR]))


def _stamp(path: Path) -> tuple:
    """Sort key of a results file: the time stamp in its name (bench's and --output-layer's files
    both carry one, at different places), then the name."""
    import re

    match = re.search(r"(\d{8})T?-?(\d{6})", path.name)
    return ("".join(match.groups()) if match else "", path.name)


def _cpu_run(path: Path) -> bool:
    """Whether a results file is a CPU run (the interpreter's check of the harness, not a measurement)."""
    import json

    try:
        rows = json.loads(path.read_text()).get("rows") or []
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return any(isinstance(r, dict) and str(r.get("gpu") or r.get("device") or "").startswith("cpu") for r in rows)


def _newest_results(dirs, skip_cpu: bool, quiet: bool = False) -> tuple[list, list]:
    """([the newest grid results file], [the newest output-layer results file]) in these folders. With
    skip_cpu (report's own folders, not an --results-dir asked for) CPU runs are skipped, with a note: they
    are no report's source unless asked for."""
    from tritonrnn.perf import output_layer

    files = [p for d in dirs if d.is_dir() for p in d.glob("*.json")]
    cpu = [p for p in files if skip_cpu and _cpu_run(p)]
    if cpu and not quiet:
        print(f"skipped {len(cpu)} CPU run(s), not measurements (the newest: {max(cpu, key=_stamp)}); "
              f"--results FILE (or --results-dir DIR) renders one")
    files = [p for p in files if p not in cpu]
    layer = [p for p in files if output_layer.is_results_file(p)]
    grid_files = [p for p in files if p not in layer]
    return sorted(grid_files, key=_stamp)[-1:], sorted(layer, key=_stamp)[-1:]


def _no_results(dirs) -> None:
    from tritonrnn.perf import in_checkout, output_dir

    device_check = " (or perf/device_check.sh)" if in_checkout() else ""
    print(f"No results to render in {' or '.join(str(d) for d in dirs)}. Measure on a GPU with `tritonrnn bench`"
          f"{device_check}, which writes to {output_dir('results')}, or pass --results FILE.")


def _print_report_summary(rows: list, layer_rows: list) -> None:
    from tritonrnn.perf import report

    notes = [report.caveat(rows) if rows else None, report.output_layer_caveat(layer_rows)]
    for note in dict.fromkeys(n for n in notes if n):
        print(f"  {note.upper()}")
    for line in report.summary(rows):
        print(f"  {report.summary_text(line)}")
    for line in report.output_layer_summary(layer_rows):
        print(f"  {line}")


def _report(args) -> int:
    from tritonrnn.perf import bench, grid, output_dir, output_layer, report

    _check_results_paths(args)
    if args.prediction:
        if args.results or args.results_dir:
            raise UsageError("--prediction renders the cost model's plan: no --results or --results-dir with it")
        return _report_prediction(args)
    dirs = _results_dirs(args)
    sources = list(args.results)
    if not sources and torch.cuda.is_available() and not args.no_bench:
        _no_autotuning()
        _, path = bench.run_to_file(grid.quick_grid(), "quick", output_dir("results"), command=args.command_line)
        sources = ([path] if path else []) + _newest_results(dirs, args.results_dir is None, quiet=True)[1]
    if not sources:
        sources = [path for newest in _newest_results(dirs, args.results_dir is None) for path in newest]
    if not sources:
        _no_results(dirs)
        return _report_prediction(args)
    layer_files = [s for s in sources if output_layer.is_results_file(s)]
    grid_files = [s for s in sources if s not in layer_files]
    rows = _load_results(grid_files) if grid_files else []
    layer_rows = _load_output_layer(layer_files) if layer_files else []
    path = report.render(rows, grid_files, args.out_dir or output_dir(), (layer_rows, layer_files))
    print(f"rendered {path} from {', '.join(str(s) for s in sources)}")
    _print_report_summary(rows, layer_rows)
    return 0


def _report_prediction(args) -> int:
    """No measured results: render the cost model's offline plan, titled as a prediction."""
    from tritonrnn.perf import output_dir, plan

    rows = plan.grid_plan("h100")
    path = plan.render_prediction(rows, args.out_dir or output_dir())
    print(f"rendered {path}: a PREDICTION (cost model, H100, no GPU measured it); "
          f"{plan.headline_text(plan.headline(rows))} of the standard grid")
    return 0


def _check_out_dir(path) -> None:
    """--out-dir must be a folder, or a path where one can be made: checked before any work."""
    for existing in (p for p in (path, *path.parents) if p.exists()):
        if not existing.is_dir():
            raise UsageError(f"--out-dir {path}: {existing} is a file; --out-dir takes a folder (made if missing)")
        return


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    import tritonrnn
    from tritonrnn.perf.grid import DTYPES, MODES, PROVIDERS

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="tritonrnn", parents=[debug],
                                     description="Triton kernels for Elman RNNs: versions and kernel paths, "
                                                 "benchmark against cuDNN, tuning, performance report")
    parser.add_argument("--version", action="version", version=f"tritonrnn {tritonrnn.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", parents=[debug], help="versions, GPU, and which kernel path a shape takes")
    # Defaults in SHAPE_DEFAULTS (None here: --grid standard takes these as filters where given).
    info.add_argument("--hidden-size", type=_positive_int, default=None, help="hidden size H (default 256)")
    info.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length T (default 512)")
    info.add_argument("--batch", type=_positive_int, default=None, help="batch size B (default 16)")
    info.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="data type (default float32)")
    info.add_argument("--offline", metavar="GPU", type=str.lower, default=None,
                      help="what that GPU (h100 or h200) would run, predicted by the cost model from the shipped "
                           "offline sm_90 compile, with no GPU here: the chosen layout and every candidate's step")
    info.add_argument("--grid", choices=["standard"], default=None,
                      help="with --offline: every standard-grid cell (3 dtypes x 4 B x 5 H, T=512), both directions; "
                           "--hidden-size, --batch, --dtype keep only the cells with that value")
    info.add_argument("--json", action="store_true",
                      help="with --offline: one JSON object per cell and direction")
    info.set_defaults(run=_info)

    check = commands.add_parser("selftest", parents=[debug],
                                help="run every layout's self-test on this device now and print the table "
                                     "(the dispatcher runs each at its first use and caches the verdict)")
    check.add_argument("--interpreter", action="store_true",
                       help="in Triton's CPU interpreter (as TRITON_INTERPRET=1 does), not on the GPU")
    check.add_argument("--json", action="store_true", help="one JSON object per layout and dtype")
    check.set_defaults(run=_selftest)

    def add_cases(sub, grids, grid_help):
        sub.add_argument("--grid", choices=grids, default=grids[0], help=grid_help)
        sub.add_argument("--shapes", nargs="+", default=(), metavar="SHAPE",
                         help="instead of a grid: shapes like T512-B16-H256[-I128][-L2][-bidir][-packed]")
        sub.add_argument("--dtypes", nargs="+", choices=DTYPES + ("float64",), default=None,
                         help="only these dtypes (with --shapes: float32 unless given)")

    bench = commands.add_parser("bench", parents=[debug],
                                help="time tritonrnn, cuDNN and torch-native (checked against float64); "
                                     "write one results JSON")
    add_cases(bench, ["standard", "quick", "smoke"],
              "standard: the full grid and its lines (a GPU); quick: a subset sized for ~4 minutes on an H100; "
              "smoke: two tiny shapes, to check the harness on the CPU (TRITON_INTERPRET=1), not a measurement")
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: both")
    bench.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS), help="default: all")
    bench.add_argument("--out-dir", type=Path, default=None,
                       help="where the results JSON goes (default: the checkout's perf/results/ when run from a "
                            "checkout, else the current directory)")
    bench.add_argument("--no-profile", action="store_true",
                       help="skip the profiling pass (kernel names, and which backend cuDNN's calls really ran)")
    bench.add_argument("--autotune", action="store_true",
                       help="let Triton's autotuner tune shapes with no shipped config (slow first calls)")
    bench.add_argument("--output-layer", nargs="*", type=_positive_int, default=None, metavar="ROWS",
                       help="instead of the RNN cases: the fused output layer (linear_cross_entropy) against "
                            "F.cross_entropy(F.linear(...)), forward + backward, time and peak memory, at these "
                            "row counts T*B (default 8192 16384 32768) and --dtypes (default bfloat16)")
    bench.add_argument("--vocab", type=_positive_int, default=32768,
                       help="with --output-layer: the vocabulary (default 32768)")
    bench.add_argument("--hidden", type=_positive_int, default=1024,
                       help="with --output-layer: the hidden size (default 1024)")
    bench.set_defaults(run=_bench)

    tune = commands.add_parser("tune", parents=[debug],
                               help="search the kernels' tuning space on this GPU; write <GPU>.json")
    add_cases(tune, ["standard", "quick"], "standard: every grid shape; quick: the quick grid's shapes")
    tune.add_argument("--out-dir", type=Path, default=None,
                      help="where <GPU>.json goes (default: the checkout's kernels/tuned/, which the launchers "
                           "read, when run from a checkout, else the current directory)")
    tune.set_defaults(run=_tune)

    report = commands.add_parser("report", parents=[debug],
                                 help="render REPORT.md and plots (with a GPU and no --results: quick bench first)")
    report.add_argument("--results", nargs="+", type=Path, default=(), metavar="FILE",
                        help="results files to render, grid and output-layer ones (default: the newest of each "
                             "kind in --results-dir)")
    report.add_argument("--results-dir", type=Path, default=None,
                        help="where to find results (default: where bench writes, the checkout's perf/results/ "
                             "or else the current directory, then the results shipped in the package)")
    report.add_argument("--out-dir", type=Path, default=None,
                        help="where REPORT.md and plots/ go (default: the checkout's perf/ when run from a "
                             "checkout, else the current directory)")
    report.add_argument("--no-bench", action="store_true", help="with a GPU: render without measuring first")
    report.add_argument("--prediction", action="store_true",
                        help="render the cost model's prediction (PREDICTION.md) even where results exist")
    report.set_defaults(run=_report)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse: usage line, one error line, exit 2
    args.command_line = _command(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    debug = getattr(args, "debug", False)
    prefix = f"tritonrnn {args.command}: error:"
    try:
        if getattr(args, "out_dir", None) is not None:
            _check_out_dir(args.out_dir)
        return args.run(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"{prefix} {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (tritonrnn info ... | head): nothing wrong, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail again
        return 0
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if debug:
            raise
        print(f"{prefix} {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
