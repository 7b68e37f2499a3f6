"""Work that waits for another package's module: run a callback right after that module is imported, or
at once if it is imported already. tritonrnn never imports these modules itself (each takes seconds):

- opacus: tritonrnn.privacy (grad and norm samplers, the validator), so that Opacus support needs
  nothing beyond `import tritonrnn`, whichever of tritonrnn and Opacus is imported first;
- torch._inductor.lowering: tritonrnn.onnx's inductor fallbacks (see there).

A finder on sys.meta_path finds nothing itself: for a watched module it returns the spec the other
finders give, with its loader wrapped to run the callbacks after the module's own code. A spec asked for
without an import (importlib.util.find_spec) changes nothing: the finder waits for the import.
"""
import importlib.abc
import sys
import warnings

_WAITING = {}  # module name -> callbacks not run yet


def _run(name: str) -> None:
    for callback in _WAITING.pop(name, ()):
        try:
            callback()
        except Exception as error:  # the other package still imports; only tritonrnn's extra is missing
            warnings.warn(f"tritonrnn: no support for {name} ({type(error).__name__}: {error})", stacklevel=3)
    if not _WAITING:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the callbacks waiting for it."""

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _run(self.name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _WAITING:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def when_imported(name: str, callback) -> None:
    """callback() now if module `name` is imported, else right after its import."""
    if name in sys.modules:
        _WAITING.setdefault(name, []).append(callback)
        _run(name)
        return
    _WAITING.setdefault(name, []).append(callback)
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
