"""Tokens/sec side by side with llama.cpp on the same file, prompt ids, threads and greedy decode.

Usage:
  tokens_per_sec.py [MODEL] [--prompt-tokens N] [--gen-tokens N] [--threads N] [--repeat N]

Options:
  --prompt-tokens N  Prompt length [default: 128].
  --gen-tokens N     Greedy tokens to generate [default: 64].
  --threads N        Threads for both engines [default: 2].
  --repeat N         Repeats; medians are reported [default: 3].

Ours and llama.cpp (when `llama_cpp` is importable: pip install llama-cpp-python==0.3.36)
are measured interleaved in one process, repeat by repeat; medians are reported with
the ratio ours/llama.cpp. Absolute numbers on a shared machine are noise; read ratios.
`python -m cli bench --vs-llama-cpp` is the same measurement (engine/benchmark.py) plus TTFT,
peak RSS and --json.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docopt import docopt  # noqa: E402

from engine.api import Engine  # noqa: E402

from engine.benchmark import measure_llama, measure_ours, prompt_ids  # noqa: E402  (shared with `cli bench`)


def main() -> int:
    opt = docopt(__doc__)

    class a:  # noqa: N801  (plain attribute bag)
        model = opt["MODEL"]
        prompt_tokens, gen_tokens = int(opt["--prompt-tokens"]), int(opt["--gen-tokens"])
        threads, repeat = int(opt["--threads"]), int(opt["--repeat"])
    eng = Engine.load(a.model, n_ctx=a.prompt_tokens + a.gen_tokens + 8, threads=a.threads)
    ids = prompt_ids(eng, a.prompt_tokens)
    try:
        from llama_cpp import Llama
        llm = Llama(str(eng.path), n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024, n_batch=512,
                    verbose=False)
    except ImportError:
        llm = None
    measure_ours(eng, ids[:8], 2)  # warm-up: JIT load, page-in
    if llm:
        measure_llama(llm, ids[:8], 2)
    runs = {"ours": [], "llama.cpp": []}
    for _ in range(a.repeat):
        runs["ours"].append(measure_ours(eng, ids, a.gen_tokens))
        if llm:
            runs["llama.cpp"].append(measure_llama(llm, ids, a.gen_tokens))
    print(f"model {eng.path.name}, {len(ids)} prompt tokens, {a.gen_tokens} generated, {a.threads} threads, "
          f"median of {a.repeat}")
    med = {}
    for who, rs in runs.items():
        if rs:
            med[who] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s", "ttft_s")}
            print(f"{who:>10}: prefill {med[who]['prefill_tok_s']:7.1f} tok/s  decode {med[who]['decode_tok_s']:6.1f} "
                  f"tok/s  TTFT {med[who]['ttft_s']:.3f} s")
    if llm:
        print(f"{'ratio':>10}: prefill {med['ours']['prefill_tok_s'] / med['llama.cpp']['prefill_tok_s']:.2f}x  "
              f"decode {med['ours']['decode_tok_s'] / med['llama.cpp']['decode_tok_s']:.2f}x")
        same = sum(x == y for x, y in zip(runs["ours"][0]["tokens"], runs["llama.cpp"][0]["tokens"]))
        print(f"greedy tokens identical: {same}/{a.gen_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
