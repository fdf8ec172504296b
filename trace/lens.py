"""The logit lens: each layer's residual stream read through the model's own output head.

``logit_lens`` runs one forward over the prompt, keeps ``post_ffn_residual`` of the chosen
layers (a read-only hook), and puts each through the final norm and lm_head exactly as the
forward does (engine.forward.output_head): the last layer's row is the model's real output.
"""
from __future__ import annotations

import numpy as np

from engine.forward import output_head


def logit_lens(engine, ids: list[int], layers, top: int = 5) -> dict:
    """{"ids": ids, "layers": [{"layer": l, "positions": [{"pos": i, "top": [[id, logit, prob], ...]}]}]}."""
    kept = {}
    hooks = {("post_ffn_residual", L): (lambda v, p, _L=L: kept.__setitem__(_L, v.copy())) for L in layers}
    session = engine.new_session(n_ctx=max(len(ids), 1))
    session.forward(ids, hooks=hooks, all_logits=True)
    out = {"ids": [int(i) for i in ids], "layers": []}
    for L in layers:
        logits = output_head(engine.model, session, kept[L]).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        positions = []
        for i in range(len(ids)):
            best = np.argsort(-logits[i], kind="stable")[:top]
            positions.append({"pos": i, "top": [[int(t), float(logits[i, t]), float(probs[i, t])] for t in best]})
        out["layers"].append({"layer": int(L), "positions": positions})
    return out


def format_lens(result: dict, tokenizer, width: int = 12) -> str:
    """A layer x position grid of each cell's top-1 token (and its probability)."""
    def piece(t):
        return tokenizer.token_bytes(t).decode("utf-8", "replace").replace("\n", "\\n")[:width]
    head = f"{'layer':>5} " + " ".join(f"{piece(t)!r:>{width + 2}}" for t in result["ids"])
    lines = [head]
    for row in result["layers"]:
        cells = [f"{piece(p['top'][0][0])!r:>{width - 3}}{p['top'][0][2]:5.2f}" for p in row["positions"]]
        lines.append(f"{row['layer']:>5} " + " ".join(f"{c:>{width + 2}}" for c in cells))
    return "\n".join(lines)


def plot_lens(result: dict, tokenizer, path, title: str) -> None:
    """Heat map of each cell's top-1 probability, labelled with its top-1 token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.array([[p["top"][0][2] for p in row["positions"]] for row in result["layers"]])
    n_layers, n_pos = grid.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * n_pos, 1.2 + 0.32 * n_layers))
    ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i, row in enumerate(result["layers"]):
        for j, p in enumerate(row["positions"]):
            label = tokenizer.token_bytes(p["top"][0][0]).decode("utf-8", "replace").strip()[:8]
            ax.text(j, i, label, ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] > 0.6 else "black")
    ax.set_xticks(range(n_pos), [tokenizer.token_bytes(t).decode("utf-8", "replace")[:8] for t in result["ids"]],
                  rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_layers), [str(r["layer"]) for r in result["layers"]], fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    ax.set_title(title + "\n(cell: top-1 token of the layer's residual through the output head; colour: its probability)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
