"""Reading a collection back (``trace.load_collection``): one stage's rows over all shards as one
array-like, memory-mapped per shard, without concatenating the dataset in memory.

    coll = trace.load_collection("acts/")
    x = coll["ffn_swigl", 10]          # StageRows [n_tokens, width]: x[i], x[a:b], x[[i, j]], x[:, k]
    for part in x.chunks(): ...        # each shard's rows as an np.memmap, in order
    coll.token_ids, coll.offsets       # [n_tokens] int32, [n_prompts + 1] int64
    p = coll.prompt(3); p.text; p["ffn_swigl", 10]   # one prompt's rows (a view)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from trace.aprt import DTYPE, HEADER, read_aprt
from trace.collect import FORMAT, MANIFEST, SHARD_JSON, shard_name



class StageRows:
    """The rows of one (stage, layer) over every shard: shape [n_tokens, width], float32.

    Indexing with an int, a slice or an int/bool array over rows (optionally then columns:
    ``x[a:b, 5]``) reads only the rows asked for: a view of the shard's memory map when they lie
    in one shard, else a new array of just those rows. ``np.asarray(x)`` concatenates all
    shards (a full copy); ``chunks()`` walks them without one."""

    def __init__(self, parts: list[np.ndarray], width: int, name: str):
        self.parts, self.width, self.name = parts, width, name
        self.starts = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.shape = (int(self.starts[-1]), width)
        self.dtype = np.dtype(DTYPE)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self):
        return f"StageRows({self.name}, shape={self.shape}, shards={len(self.parts)})"

    def chunks(self):
        """Each shard's rows ([rows, width] memory maps), in order."""
        return iter(self.parts)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.parts) if len(self.parts) != 1 else np.array(self.parts[0])
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, rest = key[0], key[1:]
            picked = self._rows(rows)
            return picked[rest] if np.ndim(picked) == 1 else picked[(slice(None),) + rest]
        return self._rows(key)

    def _rows(self, key):
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[s][i - self.starts[s]]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                if stop <= start:
                    return np.empty((0, self.width), self.dtype)
                s0 = int(np.searchsorted(self.starts, start, side="right")) - 1
                s1 = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
                if s0 == s1:
                    return self.parts[s0][start - self.starts[s0]:stop - self.starts[s0]]
                pieces = [self.parts[s][max(start - self.starts[s], 0):min(stop - self.starts[s], len(self.parts[s]))]
                          for s in range(s0, s1 + 1)]
                return np.concatenate(pieces)
            return self._take(np.arange(start, stop, step))
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean row mask must have {n} entries, got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows are indexed by int, slice or int/bool array, not {idx.dtype}")
        return self._take(idx)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((flat.size, self.width), self.dtype)
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][flat[sel] - self.starts[s]]
        return out.reshape(idx.shape + (self.width,))


@dataclass
class CollectedPrompt:
    """One collected prompt: its index, source line, text, token ids, how many tokens
    truncation dropped, and its rows (``rows``: a slice into the collection's rows)."""
    collection: "Collection"
    index: int
    line: int
    text: str
    token_ids: np.ndarray
    truncated_tokens: int
    rows: slice

    def __getitem__(self, key) -> np.ndarray:
        """This prompt's [tokens, width] rows of (stage, layer): a view of its shard's file."""
        return self.collection[key][self.rows]


class Collection:
    """A finished collection (trace.collect): ``coll[stage, layer]`` (or ``coll[stage]`` for
    whole-model stages) is a StageRows [n_tokens, width]; ``token_ids`` [n_tokens],
    ``offsets`` [n_prompts + 1] (prompt i's rows are offsets[i]:offsets[i+1]), ``prompt(i)``."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise EngineError(f"{self.path} holds no collection ({MANIFEST} is missing)") from None
        except (OSError, ValueError) as e:
            raise EngineError(f"{self.path / MANIFEST}: not readable as JSON ({e})") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise EngineError(f"{self.path} is not a collection (its manifest's format is {m.get('format')!r})")
        if not m.get("complete"):
            n_done = sum(1 for s in m["shards"] if (self.path / shard_name(s['index']) / SHARD_JSON).exists())
            raise EngineError(f"the collection in {self.path} is incomplete ({n_done} of {len(m['shards'])} shards); "
                              f"run the same collect command again to finish it")
        self.keys = [(f["stage"], f["layer"]) for f in m["files"]]
        self._widths = {(f["stage"], f["layer"]): f["width"] for f in m["files"]}
        self._records = []
        for s in m["shards"]:
            d = self.path / shard_name(s['index'])
            try:
                self._records.append((d, json.loads((d / SHARD_JSON).read_text())))
            except (OSError, ValueError):
                raise EngineError(f"{d}: shard.json is missing or unreadable; the collection is damaged") from None
        self.token_ids = np.concatenate([np.load(d / "token_ids.npy", mmap_mode="r") for d, _ in self._records])
        local = [np.load(d / "offsets.npy") for d, _ in self._records]
        base = np.cumsum([0] + [o[-1] for o in local[:-1]]).astype(np.int64)
        self.offsets = np.concatenate([local[0][:1]] + [o[1:] + b for o, b in zip(local, base)]).astype(np.int64)
        self.n_prompts, self.n_tokens = len(self.offsets) - 1, int(self.offsets[-1])
        if len(self.token_ids) != self.n_tokens:
            raise EngineError(f"{self.path}: {len(self.token_ids)} token ids but offsets end at {self.n_tokens}")
        self._rows: dict = {}
        self._prompt_records = None

    def __len__(self) -> int:
        return self.n_prompts

    def __repr__(self):
        return f"Collection({self.path}, prompts={self.n_prompts}, tokens={self.n_tokens}, stages={len(self.keys)})"

    def __getitem__(self, key) -> StageRows:
        if isinstance(key, str):
            key = (key, None)
        stage, layer = key
        key = (stage, None if layer is None else int(layer))
        if key not in self._widths:
            have = ", ".join(s if lay is None else f"{s}:{lay}" for s, lay in self.keys)
            raise KeyError(f"{stage}" + ("" if layer is None else f" layer {layer}")
                           + f" is not in this collection (it has {have})")
        rows = self._rows.get(key)
        if rows is None:
            parts = []
            for d, rec in self._records:
                entry = next(f for f in rec["files"] if (f["stage"], f["layer"]) == key)
                path = d / entry["path"]
                shape = tuple(entry["shape"])
                if read_aprt(path).count != shape[0] * shape[1]:
                    raise EngineError(f"{path}: its header count does not match the shard's {shape}")
                parts.append(np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER.size, shape=shape))
            name = stage if layer is None else f"{stage}:{layer}"
            rows = self._rows[key] = StageRows(parts, self._widths[key], name)
        return rows

    def prompt(self, i: int) -> CollectedPrompt:
        """Prompt i (0-based, in file order among collected prompts): text, ids, rows."""
        if not -self.n_prompts <= i < self.n_prompts:
            raise IndexError(f"prompt {i} is out of range for {self.n_prompts} prompts")
        i %= self.n_prompts
        if self._prompt_records is None:
            self._prompt_records = []
            for d, _ in self._records:
                with open(d / "prompts.jsonl", encoding="utf-8") as f:
                    self._prompt_records += [json.loads(line) for line in f]
        r = self._prompt_records[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return CollectedPrompt(self, i, r["line"], r["text"], self.token_ids[a:b], r["truncated_tokens"], slice(a, b))


def load_collection(path) -> Collection:
    """Open a finished collection (the ``--out`` of ``collect``)."""
    return Collection(path)
