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
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of opacus, wraps the loader the other finders give."""

    def find_spec(self, name, path=None, target=None):
        if name != "opacus":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register the Opacus support now if Opacus is imported, else at its import."""
    if "opacus" in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]
