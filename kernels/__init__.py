"""Numba kernels. Each takes its output buffer as an argument and allocates nothing.

Numba's on-disk cache keys a compiled kernel on its own source file only, but our kernels
are built from other modules too (the IR builders of _simd.py and _panels.py, the
registry in quants.py, helpers inlined from _dequant.py or f16.py). A cache is therefore
valid only for the exact sources of this package: at import, a digest of kernels/*.py is
compared with the one stored beside the cache, and a cache made from other sources (an
edit, a `git pull`, an upgrade) is cleared, so it is recompiled instead of silently
running old code.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

_STAMP = "numgguf-kernel-sources.sha256"


def _probe():   # a function of this package, for Numba's cache locators
    pass


def _clear_stale_cache() -> None:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(here.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    value = digest.hexdigest()
    from numba.core import caching
    # the places Numba may keep this package's cache, in its own order of preference
    for locator in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator):
        try:
            found = locator.from_function(_probe, str(here / "__init__.py"))
            if found is None:
                continue
            cache = Path(found.get_cache_path())
            stamp = cache / _STAMP
            if stamp.is_file() and stamp.read_text() == value:
                return
            cache.mkdir(parents=True, exist_ok=True)   # the stamp goes in before Numba's first save
            for entry in cache.glob("*.nb[ic]"):
                entry.unlink(missing_ok=True)
            stamp.write_text(value)
            return
        except OSError:   # not writable: Numba will not use this place either; try the next
            continue


_clear_stale_cache()
