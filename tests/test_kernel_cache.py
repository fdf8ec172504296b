"""A Numba cache made from other kernel sources is cleared at import (kernels/__init__.py).

Numba keys a cached kernel on its own file, but our kernels inline other modules (the
registry, IR builders): after an edit or an upgrade that leaves a kernel's own file as it
was, its cache would silently run the old code. Checked on a copy of the package with its
own cache directory: a cache survives an unchanged import and is cleared after any change
to any kernels/*.py file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ("import numpy as np; from kernels.norm import rmsnorm_serial; "
          "x = np.ones((1, 8), np.float32); rmsnorm_serial(x, x[0], 1e-6, x.copy())")


def _run(pkg_root: Path, cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(pkg_root), NUMBA_CACHE_DIR=str(cache))
    subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=pkg_root, check=True, timeout=300)


def _cached(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("norm.rmsnorm_serial*.nbi")}


def test_stale_kernel_cache_is_cleared(tmp_path):
    pkg_root, cache = tmp_path / "src", tmp_path / "cache"
    shutil.copytree(ROOT / "kernels", pkg_root / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    _run(pkg_root, cache)
    first = _cached(cache)
    assert first, "the kernel was not cached"
    index = next(cache.rglob("norm.rmsnorm_serial*.nbi"))
    mtime = index.stat().st_mtime_ns
    _run(pkg_root, cache)                       # same sources: the cache is kept as it is
    assert index.exists() and index.stat().st_mtime_ns == mtime
    registry = pkg_root / "kernels" / "quants.py"
    registry.write_text(registry.read_text() + "\n# an edit of another module\n")
    _run(pkg_root, cache)                       # another module changed: cleared, recompiled, saved anew
    assert index.exists() and index.stat().st_mtime_ns != mtime
