"""The tritonrnn command line: info, selftest, bench, tune, report.

It parses and shows: bench, tune and report are handled in tritonrnn.perf (each module's `command`, which
takes plain arguments and returns what to print and whether all went well). Usage errors (bad arguments,
missing or malformed files, no device to run on: UsageError, raised here or in perf) print one line and exit
with status 2; any other failure prints one line and exits with 1. `--debug` shows the traceback instead.
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from tritonrnn.perf import UsageError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


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
    cannot_run = problem and device.type == "cpu"
    which = "triton-interpreter (it cannot run here: see above)" if cannot_run else backend(device)
    print(f"backend on {device.type}: {which}")
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
        from tritonrnn.perf.table import verdicts

        print(verdicts(rows))
    print(f"verdicts cached in {selftest.cache_path(device)}")
    return 0


def _command(argv) -> str:
    return "tritonrnn " + " ".join(argv if argv is not None else sys.argv[1:])


def _show(outcome) -> int:
    """Print what a perf command returned (its errors first, on stderr); its exit status."""
    for line in outcome.errors:
        print(line, file=sys.stderr)
    for line in outcome.lines:
        print(line)
    return 0 if outcome.ok else 1


def _bench(args) -> int:
    from tritonrnn.perf import bench, output_layer

    if args.output_layer is not None:
        return _show(output_layer.command(args.output_layer, vocab=args.vocab, hidden=args.hidden,
                                          dtypes=args.dtypes or (), out_dir=args.out_dir,
                                          command_line=args.command_line))
    return _show(bench.command(args.grid, args.shapes, args.dtypes, modes=args.modes, providers=args.providers,
                               out_dir=args.out_dir, command_line=args.command_line, profile=not args.no_profile,
                               autotune=args.autotune))


def _tune(args) -> int:
    from tritonrnn.perf import tune

    return _show(tune.command(args.grid, args.shapes, args.dtypes, out_dir=args.out_dir,
                              command_line=args.command_line))


def _report(args) -> int:
    from tritonrnn.perf import report

    return _show(report.command(args.results, args.results_dir, out_dir=args.out_dir, prediction=args.prediction,
                                measure_first=not args.no_bench, command_line=args.command_line))


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
                           "offline sm_90 compile, with no GPU here: the chosen layout, its step under the baseline "
                           ".. the pessimistic constants, the verdict, and every candidate's step")
    info.add_argument("--grid", choices=["standard"], default=None,
                      help="with --offline: every standard-grid cell (3 dtypes x 4 B x 5 H, T=512), both directions; "
                           "--hidden-size, --batch, --dtype keep only the cells with that value")
    info.add_argument("--json", action="store_true",
                      help="with --offline: one JSON object of the constants (baseline, pessimistic, source) and "
                           "the installed Triton, then one per cell and direction")
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
