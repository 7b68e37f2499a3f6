"""The tritonrnn command line: `tritonrnn info`."""
import argparse
import platform
import sys

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonrnn", description="Triton kernels for Elman RNNs")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, GPU, and which kernel path a shape takes")
    info.add_argument("--hidden-size", type=int, default=256)
    info.add_argument("--seq-len", type=int, default=512)
    info.add_argument("--batch", type=int, default=16)
    info.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
