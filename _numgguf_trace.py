"""Make ``import trace`` find numgguf's ``trace`` package, from any working directory.

Our ``trace/`` package shares its name with the standard library's ``trace`` module, and
the standard library comes before site-packages (and before an editable install's source
folder) on ``sys.path``, so a plain import would find the standard library's module.
Installing numgguf puts ``numgguf-trace.pth`` into site-packages (see ``setup.py``); at
interpreter start-up it calls ``install()``, which puts a finder at the front of
``sys.meta_path`` that resolves exactly the top-level name ``trace`` to the package beside
this file. Submodules (``trace.sink``, ...) are then found through the package's
``__path__`` as usual. This is the mechanism setuptools uses to replace ``distutils``
(``distutils-precedence.pth``). In a venv with numgguf installed the standard library's
``trace`` module is therefore not importable; nothing numgguf depends on uses it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig

_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trace")


class TraceFinder:
    """A meta path finder for the one name ``trace``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "trace" or not os.path.isfile(os.path.join(_PACKAGE_DIR, "__init__.py")):
            return None
        if _earlier_trace_package():
            return None   # e.g. another checkout's root is the working directory: it wins, as usual
        return importlib.util.spec_from_file_location(
            "trace", os.path.join(_PACKAGE_DIR, "__init__.py"), submodule_search_locations=[_PACKAGE_DIR])

    @classmethod
    def invalidate_caches(cls):
        pass


def _earlier_trace_package() -> bool:
    """Whether a sys.path entry before the standard library holds a ``trace`` package (the
    script's folder, the working directory, PYTHONPATH): the normal import system finds that
    one first, as it would any package there."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    for entry in sys.path:
        folder = os.path.realpath(entry or os.getcwd())
        if folder == stdlib:
            return False
        if os.path.isfile(os.path.join(folder, "trace", "__init__.py")):
            return True
    return False


def install() -> None:
    """Put TraceFinder first on sys.meta_path (once)."""
    if not any(f is TraceFinder for f in sys.meta_path):
        sys.meta_path.insert(0, TraceFinder)
