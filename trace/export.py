"""Export a collection for other tools, with those formats' own writers.

- ``arrow``: an Arrow IPC stream file (pyarrow's writer), the file format Hugging Face
  ``datasets`` keeps and opens with ``Dataset.from_file(PATH)``. One row per token: ``prompt``
  (collected prompt index), ``position`` (in its prompt), ``token_id``, and one column per
  (stage, layer) named ``<stage>.<layer>`` (``<stage>`` for whole-model stages), a fixed-size
  list of float32 [width]. Written one shard at a time (record batches of at most
  ``BATCH_ROWS`` rows), so memory stays at a batch whatever the collection's size.
- ``safetensors``: one file (safetensors' numpy writer) with tensors ``<stage>.<layer>``
  [n_tokens, width] float32, ``token_ids`` [n_tokens] int32, ``offsets`` [n_prompts + 1]
  int64, and the model's sha256 and the plan in its metadata. Its writer takes whole tensors,
  so the export holds the collection in memory; it is refused, with the bytes it needs, when
  that exceeds the memory available.

Both write ``PATH.partial`` and rename it when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from trace.collection import load_collection

FORMATS = ("safetensors", "arrow")
BATCH_ROWS = 8192


def column_name(stage: str, layer: int | None) -> str:
    """The exported name of (stage, layer): ``ffn_swigl.10``, or ``final_norm``."""
    return stage if layer is None else f"{stage}.{layer}"


def _need(module: str, fmt: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise EngineError(f"export --format {fmt} needs {module.split('.')[0]}: pip install 'numgguf[export]'") from None


def export(src, fmt: str, out, force: bool = False) -> dict:
    """Write the collection in folder `src` to file `out` as `fmt`; return a summary."""
    if fmt not in FORMATS:
        raise EngineError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and (out.is_dir() or not force):
        raise EngineError(f"--out {out} exists" + (" and is a directory" if out.is_dir() else "; pass --force to replace it"))
    coll = load_collection(src)
    partial = out.with_name(out.name + ".partial")
    try:
        (_arrow if fmt == "arrow" else _safetensors)(coll, partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"format": fmt, "path": str(out), "bytes": out.stat().st_size, "tokens": coll.n_tokens,
            "prompts": coll.n_prompts, "columns": [column_name(*k) for k in coll.keys]}


def _arrow(coll, path: Path) -> None:
    pa = _need("pyarrow", "arrow")
    fields = [pa.field("prompt", pa.int32()), pa.field("position", pa.int32()), pa.field("token_id", pa.int32())]
    fields += [pa.field(column_name(*k), pa.list_(pa.float32(), coll[k].width)) for k in coll.keys]
    meta = {"numgguf.collection": json.dumps({"identity": coll.manifest["identity"], "counts": coll.manifest["counts"]})}
    schema = pa.schema(fields, metadata=meta)
    prompt_of_row = np.repeat(np.arange(coll.n_prompts, dtype=np.int32), np.diff(coll.offsets))
    position = (np.arange(coll.n_tokens, dtype=np.int64) - np.repeat(coll.offsets[:-1], np.diff(coll.offsets)))
    stage_rows = [coll[k] for k in coll.keys]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for a in range(0, coll.n_tokens, BATCH_ROWS):
            b = min(a + BATCH_ROWS, coll.n_tokens)
            cols = [pa.array(prompt_of_row[a:b]), pa.array(position[a:b].astype(np.int32)),
                    pa.array(np.asarray(coll.token_ids[a:b], np.int32))]
            for rows in stage_rows:
                block = np.ascontiguousarray(rows[a:b])
                cols.append(pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), rows.width))
            writer.write_batch(pa.record_batch(cols, schema=schema))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _safetensors(coll, path: Path) -> None:
    st = _need("safetensors.numpy", "safetensors")
    need = sum(4 * coll[k].shape[0] * coll[k].width for k in coll.keys) * 2   # the arrays, then the file image
    avail = _available_memory()
    if avail is not None and need > avail:
        raise EngineError(f"export --format safetensors holds the whole collection in memory ({need / 1e9:.2f} GB "
                          f"needed, {avail / 1e9:.2f} GB available); use --format arrow, which streams")
    tensors = {column_name(*k): np.ascontiguousarray(np.asarray(coll[k])) for k in coll.keys}
    tensors["token_ids"] = np.ascontiguousarray(coll.token_ids, np.int32)
    tensors["offsets"] = np.ascontiguousarray(coll.offsets, np.int64)
    m = coll.manifest
    meta = {"format": "numgguf-collection", "model_sha256": m["identity"]["model_sha256"],
            "identity": json.dumps(m["identity"]), "counts": json.dumps(m["counts"])}
    st.save_file(tensors, str(path), metadata=meta)
