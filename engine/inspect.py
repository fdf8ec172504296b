"""`inspect`: a model's config and a table of its tensor types."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from engine.fetch import resolve_model
from engine.model import open_model
from kernels.quants import type_name


def describe(model: str) -> str:
    """Human-readable summary: file, config fields, tensor counts and bytes by type."""
    path = resolve_model(model)
    gf, cfg, _ = open_model(path)
    md = gf.metadata
    lines = [f"file: {path} ({gf.size:,} bytes, GGUF v{gf.version})",
             f"name: {md.get('general.name', '?')}",
             f"tokenizer: {md.get('tokenizer.ggml.model', '?')} (pre {md.get('tokenizer.ggml.pre', '?')}), "
             f"chat template: {'yes' if md.get('tokenizer.chat_template') else 'no'}",
             "config:"]
    lines += [f"  {k:<12} {v}" for k, v in asdict(cfg).items()]
    count, nbytes, params = Counter(), Counter(), Counter()
    for info in gf.tensors.values():
        t = type_name(info.ggml_type)
        count[t] += 1
        nbytes[t] += info.nbytes
        n = 1
        for d in info.ne:
            n *= d
        params[t] += n
    lines.append("tensors:")
    lines.append(f"  {'type':<6} {'count':>6} {'params':>14} {'bytes':>15}")
    for t in sorted(count, key=lambda t: -nbytes[t]):
        lines.append(f"  {t:<6} {count[t]:>6} {params[t]:>14,} {nbytes[t]:>15,}")
    lines.append(f"  {'total':<6} {sum(count.values()):>6} {sum(params.values()):>14,} {sum(nbytes.values()):>15,}")
    return "\n".join(lines)
