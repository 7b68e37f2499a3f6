"""tritonrnn: Triton GPU kernels for Elman RNNs, behind drop-in torch.nn.RNN / RNNCell modules."""
from importlib import import_module as _import_module
from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parent.parent
# kernels/ and perf/ sit beside this folder in a checkout and install as tritonrnn.kernels and tritonrnn.perf
# (pyproject.toml's package-dir; docs/DESIGN.md D24): a checkout runs installed.
try:
    _kernels = _import_module("tritonrnn.kernels")
except ModuleNotFoundError as missing:
    if missing.name != "tritonrnn.kernels":
        raise
    raise ModuleNotFoundError("tritonrnn.kernels is not installed: kernels/ installs with the package; in a checkout "
                              "run `pip install -e .` first", name=missing.name) from None
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "kernels" / "__init__.py").is_file() and \
        _Path(_kernels.__file__).resolve().parent != (_ROOT / "kernels").resolve():
    raise ImportError(f"tritonrnn comes from the checkout {_ROOT} but tritonrnn.kernels from "
                      f"{_Path(_kernels.__file__).parent}, another install: run `pip install -e .` in this "
                      f"checkout (or run Python outside it)")
from tritonrnn import functional, onnx, reference
from tritonrnn.dispatch import backend, kernel_path
from tritonrnn.modules import RNN, RNNCell, convert, unconvert
from tritonrnn.lm import ElmanLM
from tritonrnn import _after_import

# Opacus's grad samplers and validator for the layers, once Opacus is imported; inductor's fallbacks for
# the ops that carry an ONNX decomposition, once inductor's lowering is (tritonrnn.onnx).
_after_import.when_imported("opacus", lambda: __import__("tritonrnn.privacy"))
_after_import.when_imported("torch._inductor.lowering", onnx.inductor_fallbacks)



def _version() -> str:
    """pyproject.toml's version: read there in a checkout (an editable install's metadata keeps the version
    it was installed with), else from the installed distribution's metadata."""
    pyproject = _ROOT / "pyproject.toml"
    if (_ROOT / "kernels" / "__init__.py").is_file() and pyproject.is_file():
        import re

        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.M)
        if match:
            return match.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tritonrnn")
    except PackageNotFoundError:  # a copy of the sources, neither installed nor a checkout
        return "unknown"


__version__ = _version()
__all__ = ["ElmanLM", "RNN", "RNNCell", "backend", "convert", "functional", "kernel_path", "reference", "unconvert"]
