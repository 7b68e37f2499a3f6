"""The tritonrnn command line: info, bench, tune, report."""
import argparse
import platform
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _info(args) -> int:
    import triton

    import tritonrnn
    from tritonrnn.dispatch import backend, describe, interpreter_enabled

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"tritonrnn {tritonrnn.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn})")
    print(f"triton    {triton.__version__}")
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


def _no_autotuning() -> None:
    """Benchmarks measure the shipped tuned configs or the defaults: the autotuner would first
    tune every shape (slow, and not what a timed call runs)."""
    import os

    os.environ["TRITONRNN_AUTOTUNE"] = "0"


def _command(argv) -> str:
    return "tritonrnn " + " ".join(argv if argv is not None else sys.argv[1:])


def _bench(args) -> int:
    from tritonrnn.perf import bench, grid

    if not args.autotune:
        _no_autotuning()
    cases = grid.select(args.grid, args.shapes, args.dtypes)
    results, path = bench.run_to_file(cases, "custom" if args.shapes else args.grid, args.out_dir,
                                      modes=args.modes, providers=args.providers, command=args.command,
                                      profile=not args.no_profile)
    failed = [r for r in results["rows"] if r["status"] in ("wrong", "error")]
    print(f"results: {path} ({len(results['rows'])} rows, {len(failed)} wrong or failed"
          f"{'' if results['complete'] else ', interrupted'})")
    return 1 if failed or not results["complete"] else 0


def _tune(args) -> int:
    from tritonrnn.perf import grid, measure, tune

    if not torch.cuda.is_available():
        print("tritonrnn tune: needs a CUDA GPU (timings under the interpreter mean nothing)", file=sys.stderr)
        return 2
    cases = grid.select(args.grid, args.shapes, args.dtypes)
    shapes = [(c.dtype, c.hidden, c.batch) for c in cases]
    outcome = tune.tune(shapes, measure.cuda_timer, torch.device("cuda"), command=args.command)
    for r in outcome["results"]:
        best = r["best"]
        verdict = "written" if r["written"] else "default kept"
        print(f"{r['key']:32s} default {r['default_ms']:.3f} ms, best "
              f"{best['time_ms']:.3f} ms {best['path']} {best['config']} -> {verdict}" if best else
              f"{r['key']:32s} no candidate ran")
    print(f"tuned configs: {outcome['path']}")
    return 0


def _report(args) -> int:
    from tritonrnn.perf import bench, grid, report

    sources = list(args.results)
    if not sources and torch.cuda.is_available() and not args.no_bench:
        _no_autotuning()
        _, path = bench.run_to_file(grid.quick_grid(), "quick", args.results_dir, command=args.command)
        sources = [path] if path else []
    if not sources:
        found = sorted(args.results_dir.glob("*.json"))
        sources = found[-1:]  # the newest run
    if not sources:
        print(f"No results to render: {args.results_dir} holds none yet. Measure on a GPU with "
              f"`tritonrnn bench` (or perf/device_check.sh), or pass --results FILE.")
        return 0
    rows = bench.load(sources)
    path = report.render(rows, sources, args.out_dir)
    print(f"rendered {path} from {', '.join(str(s) for s in sources)}")
    for s in report.summary(rows):
        print(f"  {s['dtype']:9s} {s['mode']:9s} geomean speedup over cuDNN {s['geomean']:.2f}, "
              f"min {s['min']:.2f} ({s['min_case']})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonrnn", description="Triton kernels for Elman RNNs")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, GPU, and which kernel path a shape takes")
    info.add_argument("--hidden-size", type=int, default=256)
    info.add_argument("--seq-len", type=int, default=512)
    info.add_argument("--batch", type=int, default=16)
    info.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    info.set_defaults(run=_info)

    from tritonrnn.perf import PERF_DIR, RESULTS_DIR
    from tritonrnn.perf.grid import DTYPES, MODES, PROVIDERS

    def add_cases(sub, grids):
        sub.add_argument("--grid", choices=grids, default=grids[0],
                         help="standard: the full grid and its lines; quick: a ~4 minute subset on an H100")
        sub.add_argument("--shapes", nargs="+", default=(), metavar="SHAPE",
                         help="instead of a grid: shapes like T512-B16-H256[-I128][-L2][-bidir][-packed]")
        sub.add_argument("--dtypes", nargs="+", choices=DTYPES + ("float64",), default=None)

    bench = commands.add_parser("bench", help="time tritonrnn, cuDNN and torch-native; write perf/results/*.json")
    add_cases(bench, ["standard", "quick", "smoke"])
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    bench.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    bench.add_argument("--no-profile", action="store_true", help="skip recording kernel names")
    bench.add_argument("--autotune", action="store_true",
                       help="let Triton's autotuner tune shapes with no shipped config (slow first calls)")
    bench.set_defaults(run=_bench)

    tune = commands.add_parser("tune", help="search the kernels' tuning space on this GPU; write kernels/tuned/")
    add_cases(tune, ["standard", "quick"])
    tune.set_defaults(run=_tune)

    report = commands.add_parser("report", help="render perf/REPORT.md and plots (with a GPU: quick bench first)")
    report.add_argument("--results", nargs="+", type=Path, default=(), help="results files (default: newest)")
    report.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    report.add_argument("--out-dir", type=Path, default=PERF_DIR)
    report.add_argument("--no-bench", action="store_true", help="with a GPU: render without measuring")
    report.set_defaults(run=_report)

    args = parser.parse_args(argv)
    args.command = _command(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
