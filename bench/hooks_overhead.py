"""What hooks cost in decode steps: none registered, one read-only hook, attention hooks (unfused).

    python bench/hooks_overhead.py [MODEL] [--steps 64] [--repeat 5]

Each round prefills a 128-token raw prompt in a new session and times `--steps` greedy decode
steps per configuration, interleaved; tok/s are from the fastest round (least disturbed by
other load). Run it on two checkouts to compare "no hook" against a forward without the hook
mechanism (a checkout whose Session.forward takes no `hooks` runs the first row only).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from engine.api import Engine  # noqa: E402
from engine.benchmark import prompt_ids  # noqa: E402


def decode(eng, ids, steps, hooks):
    s = eng.new_session(n_ctx=len(ids) + steps + 1)
    logits = s.prefill(ids)
    kw = {} if hooks is None else {"hooks": hooks}
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(s.forward([tok], **kw)[0]))
    return steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-q4_k_m")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    eng = Engine.load(a.model, quiet=True)
    eng.warm_up()
    ids = prompt_ids(eng, 128)
    configs = {"no hook": None}
    if "hooks" in inspect.signature(eng.new_session().forward).parameters:
        n = eng.config.n_layers
        configs["read-only hook, ffn_out of one layer"] = {("ffn_out", n // 2): lambda v, p: None}
        configs["attn_softmax hooks, every layer"] = {("attn_softmax", i): (lambda v, p: None) for i in range(n)}
    for hooks in configs.values():
        decode(eng, ids, 4, hooks)   # kernels of every path loaded
    best = {k: 0.0 for k in configs}
    for r in range(a.repeat):
        for k, hooks in configs.items():
            best[k] = max(best[k], decode(eng, ids, a.steps, hooks))
    print(f"{a.model}: decode tok/s, best of {a.repeat} rounds of {a.steps} steps after a 128-token prompt")
    for k, v in best.items():
        print(f"  {k:<40} {v:7.2f} tok/s  x{v / best['no hook']:.3f}")


if __name__ == "__main__":
    main()
