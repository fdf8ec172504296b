"""Cost of tracing a whole generation: the same greedy generation untraced and traced.

    python bench/generation_trace.py [MODEL] [--prompt-tokens 128] [--gen-tokens 64] [--repeat 5]

A 128-token raw prompt, then 64 greedy tokens (no stop at end of generation, so every run does
the same work), in three configurations, interleaved round by round:
- untraced: a session's generate() with its scratch sink;
- ffn_swigl, layers 0-3: trace.capture.capture_generation (4 files);
- all stages, all layers: every file, and the bytes they take.
Each traced run includes what a user pays: creating the files at full size, the forwards
computing into their memory maps, cutting and publishing them, writing the manifest. The
ratio is traced / untraced from the minimum over rounds (the run least disturbed by other
load on the machine). The model must be in the cache; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.api import Engine  # noqa: E402
from engine.benchmark import prompt_ids  # noqa: E402
from engine.fetch import model_path  # noqa: E402
from engine.sampling import Sampler  # noqa: E402
from trace.capture import capture_generation, plan_for_model  # noqa: E402

CONFIGS = {"ffn_swigl, layers 0-3": ("ffn_swigl", "0-3"), "all stages, all layers": ("all", "all")}


def untraced(eng, ids, gen):
    s = eng.new_session(n_ctx=len(ids) + gen)
    t0 = time.perf_counter()
    out = list(s.generate(ids, max_tokens=gen, sampler=Sampler(), stop_at_eog=False))
    return time.perf_counter() - t0, out, 0


def traced(eng, ids, gen, stages, layers):
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-trace-"))
    try:
        plan = plan_for_model(stages, layers, eng.config)
        t0 = time.perf_counter()
        m = capture_generation(eng, ids, plan, tmp, "bench", gen, Sampler(), stop_at_eog=False)
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        return seconds, m["generated_ids"], size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    path = Path(a.model) if a.model.endswith(".gguf") else model_path(a.model)
    if not path.is_file():
        sys.exit(f"error: {path} not found; fetch the model first (python -m cli fetch)")
    eng = Engine.load(str(path), quiet=True)
    eng.warm_up()
    ids = prompt_ids(eng, a.prompt_tokens)
    runs = {"untraced": [], **{k: [] for k in CONFIGS}}
    sizes, tokens = {}, None
    untraced(eng, ids, 4)   # kernels for every shape of this prompt
    for k, (stages, layers) in CONFIGS.items():
        traced(eng, ids, 2, stages, layers)
    for r in range(a.repeat):
        sec, toks, _ = untraced(eng, ids, a.gen_tokens)
        runs["untraced"].append(sec)
        tokens = tokens or toks
        for k, (stages, layers) in CONFIGS.items():
            sec, toks, size = traced(eng, ids, a.gen_tokens, stages, layers)
            assert toks == tokens, f"{k}: the traced generation produced other tokens"
            runs[k].append(sec)
            sizes[k] = size
        print(f"round {r + 1}/{a.repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()),
              file=sys.stderr)
    base = min(runs["untraced"])
    print(f"{path.stem}: {len(ids)} prompt tokens + {a.gen_tokens} generated, min of {a.repeat} rounds")
    print(f"  untraced                 {base:7.3f} s")
    for k in CONFIGS:
        print(f"  {k:<24} {min(runs[k]):7.3f} s  x{min(runs[k]) / base:.3f}  ({sizes[k] / 1e6:,.1f} MB written)")


if __name__ == "__main__":
    main()
