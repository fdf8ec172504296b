"""Collection throughput against plain prefill of the same prompts (issue: dataset-scale collection).

    python bench/collect_throughput.py [MODEL] [--prompts N] [--stages LIST] [--layers RANGE] [--no-ray] [--json]

Measured in one run, in this order, on the same prompt ids (chat template applied):
1. plain prefill: one process, all cores' threads, one forward per prompt into scratch (no
   trace), after a warm-up forward: tokens / seconds of the forwards alone;
2. `collect --workers 2` (local worker processes, cores / 2 threads each), end to end: from the
   call to the finished manifest, worker start-up and model loads included;
3. `collect --ray` on a local Ray cluster (`ray.init(num_cpus=cores)`), two actors, end to end
   (the cluster's own start-up excluded: a user starts it once).
Reported: tokens/s of each, the ratios to plain prefill, and disk bytes per token.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBJECTS = ["the moon", "photosynthesis", "prime numbers", "the French revolution", "volcanoes", "sorting algorithms",
            "the immune system", "jazz", "black holes", "the Roman empire", "tides", "compilers", "bees",
            "the printing press", "glaciers", "cryptography", "the heart", "rainbows", "the stock market", "octopuses"]
FORMS = ["Explain {} to a ten-year-old.", "Write two sentences about {}.", "What is the most surprising fact about {}?",
         "Give me a short quiz question about {}, with its answer.", "Summarise what is known about {} in one paragraph.",
         "Why do people find {} interesting?", "List three common misconceptions about {}.",
         "Describe {} as a poet would, in a few lines.", "How would you teach {} in five minutes?",
         "What questions about {} are still open?"]


def prompts(n: int) -> list[str]:
    return [FORMS[(i // len(SUBJECTS)) % len(FORMS)].format(SUBJECTS[i % len(SUBJECTS)]) + ("" if i < 200 else f" ({i})")
            for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-q4_k_m")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--stages", default="ffn_swigl")
    ap.add_argument("--layers", default="10,20")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from engine.api import Engine
    from trace.collect import collect, collection_plan
    cores = os.cpu_count() or 1
    eng = Engine.load(a.model, threads=cores, quiet=True)
    texts = prompts(a.prompts)
    tmp = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    try:
        pfile = tmp / "prompts.jsonl"
        pfile.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        ids = [eng.prompt_ids(t) for t in texts]
        n_tokens = sum(map(len, ids))
        plan = collection_plan(a.stages, a.layers, eng.config)
        eng.warm_up()
        s = eng.new_session(n_ctx=max(map(len, ids)))
        s.forward_view(ids[0], 0)
        t0 = time.perf_counter()
        for x in ids:
            s.forward_view(x, 0)
        plain = n_tokens / (time.perf_counter() - t0)
        result = {"model": a.model, "prompts": len(texts), "tokens": n_tokens, "stages": list(plan.stages),
                  "layers": list(plan.layers), "plain_prefill_tok_s": round(plain, 2)}
        print(f"{len(texts)} prompts, {n_tokens} tokens; plain prefill ({cores} threads): {plain:.1f} tok/s",
              file=sys.stderr)

        t0 = time.perf_counter()
        m = collect(eng, pfile, plan, tmp / "local", workers=2, threads=max(1, cores // 2), progress=False)
        local = n_tokens / (time.perf_counter() - t0)
        result.update(workers2_tok_s=round(local, 2), workers2_ratio=round(local / plain, 3),
                      disk_bytes_per_token=m["counts"]["bytes_per_token"])
        print(f"collect --workers 2: {local:.1f} tok/s ({local / plain:.2f}x plain); "
              f"{m['counts']['bytes_per_token']:.0f} bytes per token on disk", file=sys.stderr)

        if not a.no_ray:
            import logging
            import ray
            ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.ERROR)
            try:
                t0 = time.perf_counter()
                collect(eng, pfile, plan, tmp / "ray", use_ray=True, workers=2, threads=max(1, cores // 2),
                        progress=False)
                rayed = n_tokens / (time.perf_counter() - t0)
            finally:
                ray.shutdown()
            result.update(ray_tok_s=round(rayed, 2), ray_ratio=round(rayed / plain, 3))
            print(f"collect --ray (local cluster, 2 actors): {rayed:.1f} tok/s ({rayed / plain:.2f}x plain)",
                  file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
