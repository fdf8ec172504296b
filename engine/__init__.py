"""Numba-accelerated CPU inference engine for GGUF models."""
import os as _os

# numpy's BLAS threads fight Numba's worker threads on small machines.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_os.environ.setdefault("OMP_NUM_THREADS", "1")
_os.environ.setdefault("MKL_NUM_THREADS", "1")


def __getattr__(name):
    # Lazy so that `import engine.fetch` does not pay for numba.
    if name == "Engine":
        from engine.api import Engine
        return Engine
    raise AttributeError(name)
