"""`inspect`: whether we can run a model (and if not, what is missing), its config, and a
table of its tensor types."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from engine.fetch import resolve_model
from engine.gguf_reader import GGUFFile
from engine.model import read_config, support_problems
from kernels.quants import type_name


def describe(model: str) -> tuple[str, bool]:
    """(human-readable summary, whether we can run it). The summary: file, tokenizer, config
    fields (for a supported model), tensor counts and bytes by type, and then either
    "supported: yes" or "supported: no" with one line per thing that is missing. A file that
    is not well-formed GGUF raises EngineError instead."""
    path = resolve_model(model)
    gf = GGUFFile(path)
    problems = support_problems(gf)
    md = gf.metadata
    lines = [f"file: {path} ({gf.size:,} bytes, GGUF v{gf.version})",
             f"name: {md.get('general.name', '?')}",
             f"tokenizer: {md.get('tokenizer.ggml.model', '?')} (pre {md.get('tokenizer.ggml.pre', '?')}), "
             f"chat template: {'yes' if md.get('tokenizer.chat_template') else 'no'}",
             f"architecture: {md.get('general.architecture', '?')}"]
    if not problems:
        lines.append("config:")
        lines += [f"  {k:<12} {v}" for k, v in asdict(read_config(gf)).items()]
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
    lines.append("supported: yes" if not problems else "supported: no")
    lines += [f"  missing: {p}" for p in problems]
    return "\n".join(lines), not problems
