"""The benchmark cases.

The standard grid: fp32 (TF32 on), bf16 and fp16; B in {1, 16, 64, 256}; H in {128, ..., 2048};
T = 512; input size = H; one layer, one direction. Lines beside it: time against T at B=16, H=256;
a 4-layer bidirectional case; a PackedSequence batch with lengths spread from T/8 to T.
"""
import dataclasses
import re

from . import UsageError

DTYPES = ("float32", "bfloat16", "float16")
BATCHES = (1, 16, 64, 256)
HIDDENS = (128, 256, 512, 1024, 2048)
SEQ_LEN = 512
T_LINE = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MODES = ("inference", "training")
PROVIDERS = ("tritonrnn", "cudnn", "torch-native")


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape to measure; `group` says which part of the report it belongs to."""

    dtype: str
    batch: int
    hidden: int
    seq_len: int = SEQ_LEN
    input_size: int = 0  # 0: equal to hidden
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    group: str = "grid"  # grid | t-line | deep | packed | custom

    @property
    def inputs(self) -> int:
        return self.input_size or self.hidden

    def lengths(self) -> list:
        """Packed cases: each row's length, spread evenly from T/8 to T (in batch order); else T each."""
        if not self.packed:
            return [self.seq_len] * self.batch
        low = max(1, self.seq_len // 8)
        if self.batch == 1:
            return [self.seq_len]
        return [round(low + (self.seq_len - low) * i / (self.batch - 1)) for i in range(self.batch)]

    @property
    def name(self) -> str:
        extra = (f"-L{self.layers}" if self.layers > 1 else "") + ("-bidir" if self.bidirectional else "") + \
                ("-packed" if self.packed else "")
        return f"{self.dtype}-T{self.seq_len}-B{self.batch}-I{self.inputs}-H{self.hidden}{extra}"


def standard_grid(dtypes=DTYPES) -> list:
    cases = [Case(d, b, h) for d in dtypes for h in HIDDENS for b in BATCHES]
    cases += [Case("float32", 16, 256, seq_len=t, group="t-line") for t in T_LINE if t != SEQ_LEN]
    cases += [Case("float32", 16, 256, layers=4, bidirectional=True, group="deep")]
    cases += [Case(d, 64, 256, packed=True, group="packed") for d in ("float32", "bfloat16")]
    return cases


def quick_grid() -> list:
    """A subset that runs, compilation included, in about 4 minutes on an H100."""
    cases = [Case(d, b, h) for d in ("float32", "bfloat16") for h in (128, 512, 2048) for b in (1, 64)]
    cases += [Case("float32", 16, 256, seq_len=t, group="t-line") for t in (64, 512, 2048)]
    cases += [Case("float32", 16, 256, layers=4, bidirectional=True, group="deep", seq_len=128)]
    cases += [Case("float32", 64, 256, packed=True, group="packed")]
    return cases


def smoke_grid() -> list:
    """Tiny shapes for the CPU (interpreter) check of the harness itself: not a measurement."""
    return [Case("float32", 2, 16, seq_len=8), Case("float32", 3, 24, seq_len=6, packed=True, group="packed")]


_SHAPE = re.compile(r"^T(\d+)-B(\d+)-H(\d+)(?:-I(\d+))?(?:-L(\d+))?(-bidir)?(-packed)?$")


def parse_shape(text: str, dtype: str) -> Case:
    """'T512-B16-H256' (optionally -I<input> -L<layers> -bidir -packed) -> Case; UsageError (a ValueError) for
    text that is not a shape."""
    match = _SHAPE.match(text.strip())
    if not match:
        raise UsageError(f"bad shape {text!r}: expected e.g. T512-B16-H256[-I128][-L2][-bidir][-packed]")
    t, b, h, i, layers, bidir, packed = match.groups()
    if any(int(v) == 0 for v in (t, b, h, i, layers) if v is not None):
        raise UsageError(f"bad shape {text!r}: T, B, H, I and L must be positive")
    if dtype not in DTYPES + ("float64",):
        raise UsageError(f"unknown dtype {dtype!r}")
    return Case(dtype, int(b), int(h), seq_len=int(t), input_size=int(i or 0), layers=int(layers or 1),
                bidirectional=bool(bidir), packed=bool(packed), group="custom")


def select(grid: str = "standard", shapes=(), dtypes=None) -> list:
    """The cases of a named grid, or of user-named shapes, restricted to `dtypes` if given."""
    if shapes:
        return [parse_shape(s, d) for s in shapes for d in (dtypes or ("float32",))]
    cases = {"standard": standard_grid, "quick": quick_grid, "smoke": smoke_grid}[grid]()
    return [c for c in cases if not dtypes or c.dtype in dtypes]
