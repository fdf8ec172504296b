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


def measure_ours(eng, ids: list[int], gen: int, filled: dict | None = None) -> dict:
    """Prefill ids, then decode gen greedy tokens. With `filled` (the result of an earlier run on
    the same ids), the prefill is not repeated: decoding restarts at position len(ids), over the
    cache that run left (the positions after it are overwritten), and the prefill numbers are
    that run's."""
    t0 = time.perf_counter()
    if filled is None:
        logits = eng.prefill(ids)
        t1 = time.perf_counter()
        pre = {"prefill_tok_s": len(ids) / (t1 - t0), "ttft_s": t1 - t0, "logits": logits}
    else:
        t1, pre = t0, filled
    tok = int(np.argmax(pre["logits"]))
    out = [tok]
    for i in range(gen - 1):
        tok = int(np.argmax(eng.forward([tok], pos=len(ids) + i)[0]))
        out.append(tok)
    t2 = time.perf_counter()
    return {**pre, "decode_tok_s": (gen - 1) / (t2 - t1) if gen > 1 else 0.0, "tokens": out}


def _llama_last_logits(llm) -> np.ndarray:
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def measure_llama(llm, ids: list[int], gen: int, filled: dict | None = None) -> dict:
    """measure_ours for llama.cpp (with `filled`: its cache is cut back to len(ids) positions)."""
    t0 = time.perf_counter()
    if filled is None:
        llm.reset()
        llm.eval(ids)
        t1 = time.perf_counter()
        pre = {"prefill_tok_s": len(ids) / (t1 - t0), "ttft_s": t1 - t0,
               "logits": np.array(_llama_last_logits(llm))}
    else:
        llm.n_tokens = len(ids)            # eval() drops the cache's positions from n_tokens on
        t1, pre = t0, filled
    tok = int(np.argmax(pre["logits"]))
    out = [tok]
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(_llama_last_logits(llm)))
        out.append(tok)
    t2 = time.perf_counter()
    return {**pre, "decode_tok_s": (gen - 1) / (t2 - t1) if gen > 1 else 0.0, "tokens": out}


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step of ours reads at `context` cached positions: every weight matrix
    once (the output head too; the embedding lookup reads one row, left out) and each layer's
    K and V rows of the positions it attends (float32; sliding-window layers only their window)."""
    w = model.weights
    mats = [w.output] + [m for layer in w.layers for m in (layer.wq, layer.wk, layer.wv, layer.wo,
                                                             layer.w_gate, layer.w_up, layer.w_down)]
    total = sum(m.data.nbytes for m in mats)   # split fused tensors are disjoint row views
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        keys = min(context, cfg.window(layer)) if cfg.window(layer) else context
        total += 2 * keys * cfg.kv_dim * 4
    return total


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


FLASH_ATTN = {"off": (False,), "on": (True,), "both": (False, True)}


def _setting(flash: bool) -> str:
    return f"flash_attn_{'on' if flash else 'off'}"


def run_bench(eng, prompt_tokens: int = 128, gen_tokens: int = 64, threads: int = 2, repeat: int = 3,
              vs_llama: bool = False, log=None, ctx_fill: int = 0, flash_attn: str = "off",
              roofline: bool = False) -> dict:
    """Medians over `repeat` interleaved runs of ours and (vs_llama) llama.cpp, one instance per
    flash-attention setting of `flash_attn` ("off", "on", "both"). Returns {ours keys...,
    "llama_cpp": {name: {...}}, "ratio": {...}}: ratios are against the best llama.cpp setting of
    each column (the higher tokens/s, the lower TTFT); "llama_cpp" maps "flash_attn_off" /
    "flash_attn_on" to that setting's medians.

    ctx_fill N: the prompt is N tokens, prefilled once per engine; each repeat decodes from
    position N over that cache (decode speed with N tokens in the cache). roofline: the machine's
    read bandwidth (kernels.membw) against the bytes a decode step reads, and decode as a
    fraction of bandwidth / bytes."""
    ids = prompt_ids(eng, ctx_fill or prompt_tokens)
    measure_ours(eng, ids[:8], 2)                     # warm-up: JIT cache load, page-in
    first = measure_ours(eng, ids, gen_tokens)        # a full run before llama.cpp is in the process
    ours_peak = peak_rss_mb()
    filled = {"ours": first} if ctx_fill else {}
    llamas = {}
    if vs_llama:
        from llama_cpp import Llama
        settings = FLASH_ATTN[flash_attn]
        base = rss_mb()
        reset = _reset_peak()
        for flash in settings:
            name = _setting(flash)
            llamas[name] = Llama(str(eng.path), n_threads=threads, n_threads_batch=threads,
                                 n_ctx=max(512, len(ids) + gen_tokens + 8), n_batch=512, flash_attn=flash,
                                 verbose=False)
            run = measure_llama(llamas[name], ids, gen_tokens)
            if ctx_fill:
                filled[name] = run
        llama_peak = (peak_rss_mb() if reset else rss_mb()) - base
    runs = {"ours": [], **{name: [] for name in llamas}}
    for i in range(repeat):
        reuse = i == 0 and not vs_llama
        runs["ours"].append(first if reuse else measure_ours(eng, ids, gen_tokens, filled.get("ours")))
        for name, llm in llamas.items():
            runs[name].append(measure_llama(llm, ids, gen_tokens, filled.get(name)))
        if log:
            log(f"repeat {i + 1}/{repeat}: ours decode {runs['ours'][-1]['decode_tok_s']:.1f} tok/s"
                + "".join(f", {name} {runs[name][-1]['decode_tok_s']:.1f}" for name in llamas))
    med = lambda rs: {k: statistics.median(r[k] for r in rs) for k in KEYS}  # noqa: E731
    result = {"model": eng.path.name, "prompt_tokens": len(ids), "gen_tokens": gen_tokens, "threads": threads,
              "repeat": repeat, "ctx_fill": ctx_fill, **med(runs["ours"]), "peak_rss_mb": ours_peak}
    if llamas:
        result["llama_cpp"] = {name: {**med(runs[name]), "peak_rss_mb": llama_peak} for name in llamas}
        best = {k: (min if k == "ttft_s" else max)(v[k] for v in result["llama_cpp"].values()) for k in KEYS}
        best["peak_rss_mb"] = llama_peak
        result["ratio"] = {k: result[k] / best[k] if best[k] else None for k in KEYS + ("peak_rss_mb",)}
        first_llama = runs[next(iter(llamas))][0]["tokens"]
        same = 0
        for x, y in zip(runs["ours"][0]["tokens"], first_llama):
            if x != y:
                break
            same += 1
        result["greedy_prefix_identical"] = same
    for llm in llamas.values():
        llm.close()
    if roofline:
        from kernels.membw import read_bandwidth
        # the mean context of the timed decode steps
        per_token = decode_bytes_per_token(eng.model, len(ids) + gen_tokens // 2)
        bandwidth = read_bandwidth()
        result["roofline"] = {"read_gb_s": bandwidth / 1e9, "bytes_per_token": per_token,
                              "roofline_tok_s": bandwidth / per_token,
                              "fraction": result["decode_tok_s"] * per_token / bandwidth}
    return result


def format_bench(r: dict) -> str:
    what = (f"decode with {r['ctx_fill']} tokens in the cache (prefilled once)" if r.get("ctx_fill")
            else f"{r['prompt_tokens']} prompt tokens")
    lines = [f"model {r['model']}, {what}, {r['gen_tokens']} generated, "
             f"{r['threads']} threads, median of {r['repeat']}",
             f"{'':>16}  {'prefill tok/s':>13}  {'decode tok/s':>12}  {'TTFT s':>7}  {'peak RSS MiB':>12}"]
    llamas = r.get("llama_cpp", {})
    rows = [("ours", r)] + [("llama.cpp" if len(llamas) == 1 else "llama.cpp fa=" + k.rsplit("_", 1)[1], v)
                            for k, v in llamas.items()]
    for name, v in rows:
        lines.append(f"{name:>16}  {v['prefill_tok_s']:13.1f}  {v['decode_tok_s']:12.1f}  {v['ttft_s']:7.3f}  "
                     f"{v['peak_rss_mb']:12.0f}")
    if "ratio" in r:
        q = r["ratio"]
        against = " (against the best llama.cpp setting of each column)" if len(r["llama_cpp"]) > 1 else ""
        lines.append(f"{'ratio':>16}  {q['prefill_tok_s']:12.2f}x  {q['decode_tok_s']:11.2f}x  {q['ttft_s']:6.2f}x  "
                     f"{q['peak_rss_mb']:11.2f}x{against}")
        lines.append(f"greedy tokens identical before the first difference: {r['greedy_prefix_identical']}"
                     f"/{r['gen_tokens']}")
    if "roofline" in r:
        f = r["roofline"]
        lines.append(f"roofline: read bandwidth {f['read_gb_s']:.1f} GB/s, {f['bytes_per_token'] / 1e6:.1f} MB read per "
                     f"decode token -> {f['roofline_tok_s']:.1f} tok/s; ours at {100 * f['fraction']:.0f}% of it")
    return "\n".join(lines)
