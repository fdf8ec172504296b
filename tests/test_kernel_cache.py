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


# Kernels compiled for one weight type or set of types (the embedding lookup per type, mm_q8 per
# types mask) are closures over that constant: Numba's cache must keep each apart. If it keyed
# them on the function alone, a second process would load one type's code for another's weights.
PER_TYPE_SCRIPT = r"""
import json, sys
import numpy as np
from gguf.quants import dequantize
from gguf import GGMLQuantizationType as Q
from kernels import _span
from kernels._mm_int8 import mm_q8_for
from kernels.matmul import Int8Activations, get_rows, int8_kind, matmul_int8

rng = np.random.default_rng(7)
report = {}
for name in ("Q4_0", "Q8_0"):
    qt = Q[name]
    elems, nbytes = {"Q4_0": (32, 18), "Q8_0": (32, 34)}[name]
    w = rng.integers(0, 256, size=(8, 4 * nbytes), dtype=np.uint8)
    w.reshape(8, 4, nbytes)[:, :, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)   # finite scales
    rows = np.empty((8, 4 * elems), np.float32)
    get_rows(w, int(qt), np.arange(8), rows)
    x = rng.standard_normal((1, 4 * elems)).astype(np.float32)
    out = np.empty((1, 8), np.float32)
    matmul_int8(w, int(qt), Int8Activations().quantize(x, int8_kind(int(qt), 4 * elems)), out)
    want = dequantize(w, qt).reshape(8, -1)
    report[name] = {"rows_exact": bool(np.array_equal(rows, want)),
                    "matmul_close": bool(np.allclose(out[0], want @ x[0], rtol=0.02, atol=0.05 * np.abs(want) @ np.abs(x[0]))),
                    "rows_hits": sum(_span._rows_kernel(int(qt)).stats.cache_hits.values()),
                    "mm_hits": sum(mm_q8_for([int(qt)]).stats.cache_hits.values())}
print(json.dumps(report))
"""


def test_per_type_kernels_are_cached_apart(tmp_path):
    import json
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = [json.loads(subprocess.run([sys.executable, "-c", PER_TYPE_SCRIPT], env=env, cwd=ROOT, check=True,
                                      capture_output=True, text=True, timeout=600).stdout.splitlines()[-1])
            for _ in range(2)]
    for name in ("Q4_0", "Q8_0"):
        first, second = runs[0][name], runs[1][name]
        assert first["rows_hits"] == 0 and first["mm_hits"] == 0, f"{name}: the first run found a cache: {first}"
        assert second["rows_hits"] >= 1 and second["mm_hits"] >= 1, f"{name}: the second run compiled again: {second}"
        for run in (first, second):
            assert run["rows_exact"] and run["matmul_close"], f"{name}: wrong results {runs}"
