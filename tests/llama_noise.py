"""How far llama.cpp's last-position logits move against themselves, and ours from them: the
measurement behind the short-prompt bounds of tests/test_gemma3.py.

llama.cpp's own settings change its logits: a prompt evaluated one token per micro-batch
(n_ubatch 1) or two, or with flash attention, takes other kernels and other rounding than the
default whole-prompt batch. A forward that differs from llama.cpp by no more than llama.cpp's
settings move it cannot be told apart from a correct one by its logits, so that spread is the
bound's basis. Run (a few minutes on 2 cores; needs llama-cpp-python):

    python -m tests.llama_noise gemma3-270m-q4_k_m

It prints one block per prompt (the test's short prompts, then held-out ones that are not in any
test) and the worst of each column.
"""
from __future__ import annotations

import sys

import numpy as np

HELD_OUT = [
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The three primary colors are red, blue and",
    "东京是日本的首都，也是",
    "1, 1, 2, 3, 5, 8, 13, 21,",
    "Photosynthesis is the process by which plants",
    "SELECT name, age FROM users WHERE",
    "Dear Sir or Madam, I am writing to",
]
# llama.cpp's settings that take other code paths than the tests' (n_ubatch 2048, 2 threads, no
# flash attention); one thread is listed to show it changes nothing (ggml splits rows, not sums)
VARIANTS = {"threads 1": dict(n_threads=1, n_threads_batch=1), "n_ubatch 1": dict(n_ubatch=1, n_batch=1),
            "n_ubatch 2": dict(n_ubatch=2, n_batch=2), "flash attn": dict(flash_attn=True)}


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Max and mean |a - b| and the cosine of a and b (the three numbers the parity tests bound)."""
    d = np.abs(a - b)
    return float(d.max()), float(d.mean()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def llama_last_logits(path, ids: list[int], **settings) -> np.ndarray:
    """llama.cpp's logits at the prompt's last position, under the tests' settings updated by `settings`."""
    from llama_cpp import Llama
    from tests.test_gemma3 import LLAMA_SETTINGS
    cfg = dict(LLAMA_SETTINGS, logits_all=True)
    cfg.update(settings)
    llm = Llama(str(path), **cfg)
    try:
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    finally:
        llm.close()


def main(key: str) -> None:
    from engine.api import Engine
    from tests.conftest import model_file
    from tests.test_gemma3 import PROMPTS
    path = model_file(key)
    ours_engine, exact_engine = Engine(path, n_ctx=2048), Engine(path, n_ctx=2048, exact=True)
    prompts = [p for name, p in PROMPTS.items() if name != "long"] + HELD_OUT
    worst: dict[str, list] = {}

    def show(label, a, b):
        mx, mean, cos = difference(a, b)
        print(f"  {label:34s} max {mx:.3f}  mean {mean:.4f}  cosine {cos:.5f}")
        w = worst.setdefault(label.split(" (")[0], [0.0, 0.0, 1.0])
        w[0], w[1], w[2] = max(w[0], mx), max(w[1], mean), min(w[2], cos)

    for prompt in prompts:
        ids = ours_engine.prompt_ids(prompt, raw=True)
        print(f"{prompt!r} ({len(ids)} tokens)")
        base = llama_last_logits(path, ids)
        for name, settings in VARIANTS.items():
            show(f"llama.cpp vs itself ({name})", llama_last_logits(path, ids, **settings), base)
        show("ours vs llama.cpp", ours_engine.forward(ids)[0].astype(np.float64), base)
        show("exact vs llama.cpp", exact_engine.forward(ids)[0].astype(np.float64), base)
    print("worst:")
    for label, (mx, mean, cos) in worst.items():
        print(f"  {label:34s} max {mx:.3f}  mean {mean:.4f}  cosine {cos:.5f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m-q4_k_m")
