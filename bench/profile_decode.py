"""Where a decode step's time goes: wall time per kernel class inside engine.forward.

    python bench/profile_decode.py [MODEL] [STEPS]

Wraps every kernel engine.forward calls with a timer (adds ~1 us per call), runs a
short prefill and STEPS decode steps, and prints per-class totals per step.
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import engine.forward as fw  # noqa: E402
from engine.api import Engine  # noqa: E402

TOTALS = defaultdict(float)
COUNTS = defaultdict(int)


def _wrap(name, fn, classify=None):
    def wrapped(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        key = classify(*a) if classify else name
        TOTALS[key] += time.perf_counter() - t
        COUNTS[key] += 1
        return r
    return wrapped


def _mm_class(int8, x, group, *outs):
    from kernels.quants import type_name
    return "matmul " + " + ".join(f"{type_name(qtype)} {out.shape[1]}x{x.shape[1]}"
                                  for (_, qtype), out in zip(group.mats, outs))


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else None
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    eng = Engine.load(model, n_ctx=512, threads=int(os.environ.get("THREADS", "2")), quiet=True)
    for name in ("rmsnorm", "add_bias", "rope", "store_kv", "attention", "add", "silu_and_swiglu", "get_rows"):
        setattr(fw, name, _wrap(name, getattr(fw, name)))
    fw._mm = _wrap("mm", fw._mm, _mm_class)
    ids = list(range(100, 164))
    logits = eng.prefill(ids)
    tok = int(np.argmax(logits))
    for i in range(4):  # warm
        tok = int(np.argmax(eng.forward([tok], pos=len(ids) + i)[0]))
    TOTALS.clear()
    COUNTS.clear()
    t0 = time.perf_counter()
    for i in range(steps):
        tok = int(np.argmax(eng.forward([tok], pos=len(ids) + 4 + i)[0]))
    wall = (time.perf_counter() - t0) / steps
    kern = sum(TOTALS.values()) / steps
    print(f"{eng.path.name}: decode step {wall * 1e3:.2f} ms ({1 / wall:.1f} tok/s), kernels {kern * 1e3:.2f} ms, "
          f"python/other {(wall - kern) * 1e3:.2f} ms")
    for k, v in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<36} {v / steps * 1e3:8.3f} ms/step  {100 * v / steps / wall:5.1f}%  "
              f"calls/step {COUNTS[k] // steps}")


if __name__ == "__main__":
    main()
