"""Opacus support with nothing beyond `import tritonrnn`, whichever of tritonrnn and Opacus is imported
first: tritonrnn.privacy (grad and norm samplers, the validator) is imported as soon as Opacus is. Opacus
takes seconds to import, so tritonrnn never imports it itself: where Opacus is not imported yet, a finder
on sys.meta_path imports tritonrnn.privacy right after Opacus's own package has run.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    try:
        importlib.import_module("tritonrnn.privacy")
    except Exception as error:  # an Opacus tritonrnn.privacy cannot work with: Opacus itself still imports
        warnings.warn(f"tritonrnn: no Opacus support ({type(error).__name__}: {error})", stacklevel=3)


class _Loader(importlib.abc.Loader):
    """Opacus's own loader, then tritonrnn.privacy."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        uninstall()
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for opacus, the spec the other finders give, with its loader wrapped. A spec
    asked for without an import (importlib.util.find_spec) changes nothing: the finder stays until Opacus
    runs."""

    def find_spec(self, name, path=None, target=None):
        if name != "opacus":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register the Opacus support now if Opacus is imported, else at its import."""
    if "opacus" in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]
