"""The Triton releases the kernels run on, and every difference between them that the code meets.

Supported: Triton 3.6.0 through 3.9.x, the releases PyTorch's Linux builds bring (torch 2.11 pins
3.6.0, 2.13 pins 3.7.1, 2.14 pins 3.8; 3.9 is the newest). CI runs the kernel tests in the
interpreter and the offline sm_90 checks under each of 3.6.0, 3.7.1, 3.8.0 and 3.9.0.

What differs between them, and where it is handled (nothing else in the package tests a version):
- Triton 3.6's CPU interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be converted
  to Python scalars" from every interpreted kernel); 3.7 and later run with numpy 2.4.
  `interpreter_problem` names the fix; the layers raise it before the first interpreted kernel.
- Every release's interpreter types a block mask and'ed with a scalar condition as int32, and 3.9's
  refuses such a mask ("mask has unsupported dtype"): kernels.common.below_while builds those masks.
- The cluster launch (kernels/launch.py) calls Triton's launcher below `CompiledKernel.run` with
  the packed metadata (num_warps, num_ctas, shared memory) and num_ctas set to the cluster size;
  3.6.0, 3.7.1, 3.8.0 and 3.9.0 take the same arguments and set the cluster dimension from that
  num_ctas (read from their launchers). A release outside them is not known to: there
  `cluster_launch_refusal` refuses the layout, and the persistent layout runs instead.
- A release outside the range: one warning (`warn_if_unsupported`, at import), never a crash.
"""
import functools
import re
import warnings

import triton

OLDEST = (3, 6)
NEWEST = (3, 9)
# The releases whose launcher the cluster launch was checked against (major, minor).
CLUSTER_LAUNCH_CHECKED = ((3, 6), (3, 7), (3, 8), (3, 9))
# Below this Triton's interpreter breaks on numpy >= NUMPY_BREAKS_OLD_INTERPRETER.
INTERPRETER_NEEDS_OLD_NUMPY_BELOW = (3, 7)
NUMPY_BREAKS_OLD_INTERPRETER = (2, 4)
SUPPORTED = f"{OLDEST[0]}.{OLDEST[1]}.0 to {NEWEST[0]}.{NEWEST[1]}.x"


def parse(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '3.9.0' or '3.8.0+git1234abcd'."""
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def triton_version() -> tuple:
    return parse(triton.__version__)


def supported(version: tuple = None) -> bool:
    version = triton_version() if version is None else version
    return OLDEST <= version[:2] <= NEWEST


def unsupported_message(version: tuple = None) -> str:
    """Why this Triton is outside the range, or '' where it is inside."""
    version = triton_version() if version is None else version
    if supported(version):
        return ""
    name = ".".join(map(str, version))
    side = "newer" if version[:2] > NEWEST else "older"
    return (f"Triton {name} is {side} than the releases tritonrnn is tested with ({SUPPORTED}): the kernels "
            f"may still run; the cluster layout is off")


@functools.lru_cache(maxsize=None)
def warn_if_unsupported() -> None:
    """One warning per process where the installed Triton is outside the range."""
    message = unsupported_message()
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=2)


@functools.lru_cache(maxsize=None)
def interpreter_problem(version: tuple = None, numpy_version: tuple = None) -> str:
    """Why Triton's CPU interpreter cannot run the kernels with the numpy installed ('' where it can),
    with the fix."""
    import numpy
    version = triton_version() if version is None else version
    numpy_version = parse(numpy.__version__) if numpy_version is None else numpy_version
    if version[:2] < INTERPRETER_NEEDS_OLD_NUMPY_BELOW and numpy_version[:2] >= NUMPY_BREAKS_OLD_INTERPRETER:
        return (f"Triton {'.'.join(map(str, version))}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
                f"{'.'.join(map(str, numpy_version))}: pip install 'numpy<2.4' (or 'tritonrnn[triton36]'), "
                f"or Triton 3.7 or later")
    return ""


def cluster_launch_refusal(version: tuple = None) -> str:
    """Why the cluster launch (through Triton's launcher internals) is not taken on this Triton, or ''."""
    version = triton_version() if version is None else version
    if version[:2] in CLUSTER_LAUNCH_CHECKED:
        return ""
    return (f"the cluster launch calls Triton's launcher directly, checked on Triton "
            f"{', '.join('.'.join(map(str, v)) for v in CLUSTER_LAUNCH_CHECKED)}; this is "
            f"{'.'.join(map(str, version))}")


def layouts() -> dict:
    """Each layout and what this Triton says of it: '' where it exists here, else why not."""
    return {"sequence": "", "persistent": "", "cluster": cluster_launch_refusal(), "streamed": "", "stepwise": ""}
