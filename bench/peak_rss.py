"""Peak resident memory of long runs (issue 6, item 5): measured, not a unit test (minutes each).

    python bench/peak_rss.py generate   # `cli run` 2,048 greedy tokens, --ctx 4096, default 1.5B model
    python bench/peak_rss.py trace      # `cli trace --stages all --layers all` over a 256-token prompt
    python bench/peak_rss.py gen-trace  # `cli trace --max-tokens 2048 --stages all --layers all`
    python bench/peak_rss.py            # generate and trace

Each job runs the CLI in a child process and reports its peak RSS (ru_maxrss of the child), its
wall time, and for the trace the bytes written. Run from the repository root. The model must be
in the cache (`python -m cli fetch`); nothing is downloaded here. A baseline (`cli inspect`: the
interpreter, numpy, numba and the parsed GGUF header) is printed for comparison.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen2.5-coder-1.5b-q4_k_m"
# Counting keeps a coder model going without an end-of-generation token for thousands of tokens.
COUNT_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def _trace_prompt(n_tokens: int = 256) -> str:
    """A raw prompt of exactly n_tokens tokens for the default model."""
    sys.path.insert(0, str(REPO))
    from engine.fetch import model_path
    from engine.gguf_reader import GGUFFile
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(GGUFFile(model_path(MODEL)).metadata)
    text = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
            "The quick brown fox jumps over the lazy dog. ") * 40
    ids = tok.encode(text)[:n_tokens]
    assert len(ids) == n_tokens
    text = tok.decode(ids)
    assert len(tok.encode(text)) == n_tokens, "prompt does not round-trip to the same token count"
    return text


def _child(args: list[str]) -> tuple[int, float, str, int]:
    """Run `python -m cli *args` in a fresh process; return (exit code, seconds, stderr tail, peak RSS KiB).

    RUSAGE_CHILDREN is cumulative, so each measurement runs from a fresh wrapper process."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run([sys.executable, '-m', 'cli', *sys.argv[1:]], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.PIPE, text=True); "
            "print(r.returncode, time.perf_counter() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else '')")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    first, last = (out.stdout.splitlines() + [""])[:2]
    rc, secs, kb = first.split()
    return int(rc), float(secs), last, int(kb)


def _report(label, rc, secs, tail, kb, extra=""):
    print(f"{label:<44} exit {rc}  peak RSS {kb / 1024:8.1f} MiB  {secs:7.1f} s  {extra}")
    print(f"{'':<44} {tail}")


def baseline():
    _report("baseline: cli inspect", *_child(["inspect", MODEL]))


def generate():
    _report("run --max-tokens 2048 --ctx 4096 (greedy)",
            *_child(["run", MODEL, "--raw", "--prompt", COUNT_PROMPT, "--max-tokens", "2048", "--ctx", "4096"]))


def trace():
    prompt = _trace_prompt(256)
    tmp = Path(tempfile.mkdtemp(prefix="numgguf-rss-"))
    try:
        out = tmp / "cap"
        rc, secs, tail, kb = _child(["trace", MODEL, "--raw", "--prompt", prompt, "--stages", "all",
                                     "--layers", "all", "--out", str(out)])
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        _report("trace --stages all --layers all (256 tok)", rc, secs, tail, kb, f"{size / 2**20:.0f} MiB on disk")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gen_trace():
    """A whole generation traced: 2,048 decode steps, every stage of every layer (~25 GB of files)."""
    tmp = Path(tempfile.mkdtemp(prefix="numgguf-rss-"))
    try:
        out = tmp / "cap"
        rc, secs, tail, kb = _child(["trace", MODEL, "--raw", "--prompt", COUNT_PROMPT, "--max-tokens", "2048",
                                     "--stages", "all", "--layers", "all", "--out", str(out)])
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        _report("trace --max-tokens 2048 --stages all --layers all", rc, secs, tail, kb,
                f"{size / 2**30:.1f} GiB on disk")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    jobs = sys.argv[1:] or ["generate", "trace"]
    baseline()
    for job in jobs:
        {"generate": generate, "trace": trace, "gen-trace": gen_trace}[job]()
