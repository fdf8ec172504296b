"""Real GGUF files in more quant types, made once by llama.cpp's own quantizer into the cache.

The known models (engine.fetch.MODELS) come in only a few quant types (Q4_K_M, Q4_1), but
the engine's kernels cover many more. Tests that want a *real* file in a given type (as
opposed to a synthetic one) get it from here: the base model is requantized with
``llama_cpp.llama_model_quantize`` (``allow_requantize``) on first use and kept in
``engine.fetch.cache_dir()`` beside the fetched models, so later runs only pay for a stat.

Being made by llama.cpp itself, the files carry llama.cpp's own type choices, including its
fallbacks: where a tensor's row width is not a multiple of 256 (SmolLM2's 576, the 0.5B's
896) a k-/IQ4_XS-quant falls back to a legacy type for that tensor, so check what a file
really holds with ``tensor_types`` rather than trusting its name.

A file appears under its final name only when quantization succeeded (it is written to a
temporary name in the same directory and renamed), and an exclusive ``fcntl.flock`` on a
``.lock`` beside it keeps two concurrent pytest processes from both making it.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import sys
from collections import Counter
from pathlib import Path

from engine.fetch import cache_dir, fetch

# key -> (base model key in engine.fetch.MODELS, llama.cpp ftype name after LLAMA_FTYPE_MOSTLY_)
QUANTIZED = {
    "smollm2-135m-q4_0": ("smollm2-135m-q4_1", "Q4_0"),
    "smollm2-135m-q5_1": ("smollm2-135m-q4_1", "Q5_1"),
    "smollm2-135m-q5_k_m": ("smollm2-135m-q4_1", "Q5_K_M"),
    "smollm2-135m-iq4_nl": ("smollm2-135m-q4_1", "IQ4_NL"),
    "smollm2-135m-iq4_xs": ("smollm2-135m-q4_1", "IQ4_XS"),
    "smollm2-135m-bf16": ("smollm2-135m-q4_1", "BF16"),
    "qwen2.5-coder-1.5b-q2_k": ("qwen2.5-coder-1.5b-q4_k_m", "Q2_K"),
    "qwen2.5-coder-1.5b-q3_k_m": ("qwen2.5-coder-1.5b-q4_k_m", "Q3_K_M"),
    "qwen2.5-coder-1.5b-q5_k_m": ("qwen2.5-coder-1.5b-q4_k_m", "Q5_K_M"),
}

# ggml_log_level as ggml.h numbers it (llama_cpp/_logger.py's comment has an older order)
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5


def _quantize(key: str, src: Path, dst: Path, ftype_name: str) -> None:
    """Run llama.cpp's quantizer src -> dst, keeping its per-tensor log quiet unless it fails."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = 2

    # llama.cpp logs a line or more per tensor at INFO level, and a warning per tensor that
    # falls back to another type: keep it all, print warnings and errors, except the
    # per-tensor fallback lines (their summary "N of M tensor(s) required fallback" is
    # printed), and show the tail of everything if quantization fails. A line can come in
    # several pieces, so pieces are joined into lines before they are judged.
    lines, part = [], {"text": "", "loud": False, "level": 0}

    def flush():
        line, loud = part["text"], part["loud"]
        part["text"], part["loud"] = "", False
        if not line:
            return
        lines.append(line)
        per_tensor_fallback = line.startswith("warning: ") and "falling back to" in line
        if loud and not per_tensor_fallback:
            sys.stderr.write(line if line.endswith("\n") else line + "\n")

    @llama_cpp.llama_log_callback
    def log(level, text, _user):
        level = part["level"] if level == _GGML_LOG_CONT else level
        part["level"] = level
        part["text"] += text.decode("utf-8", "replace") if text else ""
        part["loud"] |= level in (_GGML_LOG_WARN, _GGML_LOG_ERROR)
        if part["text"].endswith("\n"):
            flush()

    old_cb, old_ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_ud))
    llama_cpp.llama_log_set(log, None)
    try:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(old_cb, old_ud)
        flush()
    if rc != 0:
        tail = "".join(lines).strip().splitlines()[-15:]
        raise RuntimeError(f"quantizing {key} ({src.name} -> {ftype_name}) failed: "
                           f"llama_model_quantize returned {rc}\n" + "\n".join(tail))


def quantized_model(key: str) -> Path:
    """Path of the requantized model `key` (see QUANTIZED), making it on first use."""
    if key not in QUANTIZED:
        raise KeyError(f"unknown quantized model key '{key}' (known: {', '.join(QUANTIZED)})")
    final = cache_dir() / f"{key}.gguf"
    if final.exists():
        return final
    base_key, ftype_name = QUANTIZED[key]
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{key}.gguf.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.exists():  # another process made it while we waited
                return final
            # we hold the lock, so any temporary file left for this key is from a crash
            for stale in final.parent.glob(f"{key}.gguf.tmp.*"):
                stale.unlink(missing_ok=True)
            src = fetch(base_key, quiet=True)
            tmp = final.parent / f"{key}.gguf.tmp.{os.getpid()}"
            try:
                _quantize(key, src, tmp, ftype_name)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def tensor_types(path) -> dict[str, int]:
    """Count of tensors per ggml type name (e.g. {'Q5_K': 120, 'F32': 61}) in a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))
