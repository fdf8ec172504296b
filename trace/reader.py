"""Reading a capture from Python: ``trace.load(DIR)``.

    cap = trace.load("traces/qwen-20261201-101500")
    x = cap["ffn_swigl", 3]        # read-only np.memmap [T, dim] (row t = position t)
    logits = cap["lm_head"]        # whole-model stages need no layer
    cap.token_ids, cap.generated_ids, cap.manifest

A single file needs no library at all: ``np.memmap(path, dtype="<f4", mode="r", offset=12)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trace.aprt import AprtError, read_aprt
from trace.capture import MANIFEST
from trace.stages import ALIASES, WHOLE_MODEL_STAGES


class Capture:
    """A finished capture folder (one with manifest.json): files by (stage, layer)."""

    def __init__(self, path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise AprtError(f"{self.path}: no {MANIFEST}; not a finished capture (an interrupted one has none)")
        try:
            self.manifest = json.loads(manifest.read_text())
            self._entries = {(e["stage"], e["layer"]): e for e in self.manifest["files"]}
        except (ValueError, KeyError, TypeError) as e:
            raise AprtError(f"{manifest}: not a capture manifest ({e})") from None

    @property
    def token_ids(self) -> list[int]:
        """Every token a forward consumed: row t of a per-token stage is token_ids[t]'s forward."""
        return list(self.manifest["token_ids"])

    @property
    def generated_ids(self) -> list[int]:
        """Every sampled token, in order (empty for a prefill-only capture)."""
        return list(self.manifest.get("generated_ids", []))

    def keys(self) -> list[tuple[str, int | None]]:
        """The (stage, layer) pairs captured, in forward order."""
        return list(self._entries)

    def __contains__(self, key) -> bool:
        return self._key(key) in self._entries

    def __getitem__(self, key) -> np.ndarray:
        """``cap["ffn_swigl", 3]`` or ``cap["lm_head"]``: a read-only memmap in the file's shape."""
        k = self._key(key)
        entry = self._entries.get(k)
        if entry is None:
            stage, layer = k
            raise KeyError(f"{self.path}: stage {stage}" + ("" if layer is None else f" layer {layer}")
                           + " was not captured")
        f = read_aprt(self.path / entry["path"])
        if f.count != int(np.prod(entry["shape"])):
            raise AprtError(f"{f.path}: {f.count} values, the manifest says shape {entry['shape']}")
        return f.values.reshape(entry["shape"])

    @staticmethod
    def _key(key) -> tuple[str, int | None]:
        stage, layer = (key, None) if isinstance(key, str) else key
        stage = ALIASES.get(stage, stage)
        if stage in WHOLE_MODEL_STAGES:
            layer = None
        return stage, (None if layer is None else int(layer))

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Capture({str(self.path)!r}: {len(self._entries)} files, {m.get('n_tokens')} tokens, "
                f"{len(self.generated_ids)} generated)")


def load(path) -> Capture:
    """Open the capture in folder `path` (see Capture)."""
    return Capture(path)
