"""Tokens/s of our engine side by side with llama.cpp: the measurement behind `cli bench`.

Both engines get the same GGUF file, the same prompt ids, the same thread count and
greedy decode. They are measured interleaved in one process, repeat by repeat, and
medians are reported with the ratio ours/llama.cpp. On a shared machine absolute
numbers are noise: read the ratios.

Peak RSS: ours is the process's peak resident set (VmHWM) after our warm-up and one
full prefill+decode, taken before llama.cpp is loaded; llama.cpp's is the growth of the
peak over the resident set we had when it was loaded, for its own warm-up run (the
kernel's peak counter is reset first where Linux allows it). Both count the
memory-mapped model file's resident pages.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

KEYS = ("prefill_tok_s", "decode_tok_s", "ttft_s")
TEXT = ("The history of computing is the story of people who wanted to calculate faster. "
        "From the abacus to mechanical calculators, from punched cards to transistors, each step "
        "traded one bottleneck for another. ")


def prompt_ids(eng, n: int) -> list[int]:
    """n token ids of a fixed English text (repeated as needed), no chat template."""
    ids = []
    while len(ids) < n:
        ids += eng.tokenizer.encode(TEXT)
    return ids[:n]


def measure_ours(eng, ids: list[int], gen: int) -> dict:
    t0 = time.perf_counter()
    logits = eng.prefill(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits))
    out = [tok]
    for i in range(gen - 1):
        tok = int(np.argmax(eng.forward([tok], pos=len(ids) + i)[0]))
        out.append(tok)
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": (gen - 1) / (t2 - t1) if gen > 1 else 0.0,
            "ttft_s": t1 - t0, "tokens": out}


def _llama_last_logits(llm) -> np.ndarray:
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def measure_llama(llm, ids: list[int], gen: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(_llama_last_logits(llm)))
    out = [tok]
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(_llama_last_logits(llm)))
        out.append(tok)
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": (gen - 1) / (t2 - t1) if gen > 1 else 0.0,
            "ttft_s": t1 - t0, "tokens": out}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set of this process so far, MiB (VmHWM; ru_maxrss where /proc is absent)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(eng, prompt_tokens: int = 128, gen_tokens: int = 64, threads: int = 2, repeat: int = 3,
              vs_llama: bool = False, log=None) -> dict:
    """Medians over `repeat` interleaved runs. Returns {ours keys..., "llama_cpp": {...}, "ratio": {...}}."""
    ids = prompt_ids(eng, prompt_tokens)
    measure_ours(eng, ids[:8], 2)                     # warm-up: JIT cache load, page-in
    first = measure_ours(eng, ids, gen_tokens)        # a full run before llama.cpp is in the process
    ours_peak = peak_rss_mb()
    llm = None
    if vs_llama:
        from llama_cpp import Llama
        base = rss_mb()
        reset = _reset_peak()
        llm = Llama(str(eng.path), n_threads=threads, n_threads_batch=threads,
                    n_ctx=max(512, prompt_tokens + gen_tokens + 8), n_batch=512, verbose=False)
        measure_llama(llm, ids, gen_tokens)
        llama_peak = (peak_rss_mb() if reset else rss_mb()) - base
    runs = {"ours": [], "llama_cpp": []}
    for i in range(repeat):
        runs["ours"].append(first if i == 0 and not vs_llama else measure_ours(eng, ids, gen_tokens))
        if llm is not None:
            runs["llama_cpp"].append(measure_llama(llm, ids, gen_tokens))
        if log:
            log(f"repeat {i + 1}/{repeat}: ours decode {runs['ours'][-1]['decode_tok_s']:.1f} tok/s"
                + (f", llama.cpp {runs['llama_cpp'][-1]['decode_tok_s']:.1f}" if llm is not None else ""))
    med = lambda rs: {k: statistics.median(r[k] for r in rs) for k in KEYS}  # noqa: E731
    result = {"model": eng.path.name, "prompt_tokens": len(ids), "gen_tokens": gen_tokens, "threads": threads,
              "repeat": repeat, **med(runs["ours"]), "peak_rss_mb": ours_peak}
    if llm is not None:
        lc = {**med(runs["llama_cpp"]), "peak_rss_mb": llama_peak}
        result["llama_cpp"] = lc
        result["ratio"] = {k: result[k] / lc[k] if lc[k] else None for k in KEYS + ("peak_rss_mb",)}
        same = 0
        for x, y in zip(runs["ours"][0]["tokens"], runs["llama_cpp"][0]["tokens"]):
            if x != y:
                break
            same += 1
        result["greedy_prefix_identical"] = same
    return result


def format_bench(r: dict) -> str:
    lines = [f"model {r['model']}, {r['prompt_tokens']} prompt tokens, {r['gen_tokens']} generated, "
             f"{r['threads']} threads, median of {r['repeat']}",
             f"{'':>10}  {'prefill tok/s':>13}  {'decode tok/s':>12}  {'TTFT s':>7}  {'peak RSS MiB':>12}"]
    rows = [("ours", r)] + ([("llama.cpp", r["llama_cpp"])] if "llama_cpp" in r else [])
    for name, v in rows:
        lines.append(f"{name:>10}  {v['prefill_tok_s']:13.1f}  {v['decode_tok_s']:12.1f}  {v['ttft_s']:7.3f}  "
                     f"{v['peak_rss_mb']:12.0f}")
    if "ratio" in r:
        q = r["ratio"]
        lines.append(f"{'ratio':>10}  {q['prefill_tok_s']:12.2f}x  {q['decode_tok_s']:11.2f}x  {q['ttft_s']:6.2f}x  "
                     f"{q['peak_rss_mb']:11.2f}x")
        lines.append(f"greedy tokens identical before the first difference: {r['greedy_prefix_identical']}"
                     f"/{r['gen_tokens']}")
    return "\n".join(lines)
