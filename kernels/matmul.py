"""Public entry points: fused dequantize-matmul, embedding lookup, dequantize.

`matmul` picks a fused matvec kernel for one token (decode) and the batched
kernel, which decodes every weight block once per call and reuses it for all
tokens, for two or more (prefill; at n=2 it already matches or beats two
matvecs). Weights are never materialised as floats.

Accuracy: each dequantized weight equals gguf's float32 value bit for bit; the
dot products accumulate in float32 in a blocked order, so
|out - x @ W.T| <= 1e-4 * (|x| @ |W|.T) for rows up to ~25000 columns (the
derivation is in tests/test_quant_kernels.py).

`matmul_int8` is the fast path for the types with an integer path in the registry
(kernels/quants.py): the activations are first quantized to int8 (`Int8Activations`,
ggml's Q8_K layout for K-quants, Q8_0 for the others) and every block dot product is an
exact integer (kernels/_mm_int8.py); the only error is the int8 rounding of the
activations, the approximation llama.cpp makes.

`MatmulGroup` + `matmul_group` is what the forward calls: the matrices that read one
input, with the choice of kernel per matrix and per prompt or decode made here, from
the registry, so the forward only names its stages.

Numba's cache keys each kernel on its own source file only, while kernels inline code
from other modules: kernels/__init__.py clears a cache made from other sources at import.
"""
from __future__ import annotations

import numba
import numpy as np

from kernels import _mm_panel
from kernels._gemm import gemm, mv_float
from kernels._matvec import mv_half_many
from kernels._mm_int8 import launch, mm_q8_for, pad_launch
from kernels._q8 import dequantize_q8
from kernels._span import dequantize_rows
from kernels.f16 import F16_TO_F32
from kernels.quants import BF16, F16, F32, LAYOUTS, SUPPORTED, TYPES, block_shape, type_name

_FLOAT_DTYPES = {F32: np.float32, F16: np.float16}
# the layouts' names, as callers pass them to Int8Activations.quantize
Q8K, Q8_0_ACT = "q8k", "q8_0"


def _weight_bytes(w, qtype: int) -> tuple[np.ndarray, int]:
    """Validate W and return (read-only uint8 [rows, row_bytes] view, cols)."""
    if qtype not in SUPPORTED:
        raise ValueError(f"unsupported weight type {type_name(qtype)} "
                         f"(supported: {', '.join(type_name(t) for t in SUPPORTED)})")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [rows, row_bytes], got shape {w.shape}")
    if not w.flags.c_contiguous:
        raise ValueError("weights must be C-contiguous")
    if qtype in _FLOAT_DTYPES and w.dtype == _FLOAT_DTYPES[qtype]:
        w = w.view(np.uint8)
    elif w.dtype != np.uint8:
        raise ValueError(f"{type_name(qtype)} weights must be uint8 bytes, got {w.dtype}")
    elems, bsize = block_shape(qtype)
    if w.shape[1] % bsize:
        raise ValueError(f"{type_name(qtype)} row of {w.shape[1]} bytes is not a whole number of "
                         f"{bsize}-byte blocks")
    w = w.view()
    w.flags.writeable = False
    return w, w.shape[1] // bsize * elems


def _float_out(out, shape) -> np.ndarray:
    """Validate an output: float32, writable, `shape`, unit stride along its last axis.

    Rows may be strided, e.g. out = buf[:, a:b], a column block of a wider buffer."""
    arr = np.asarray(out)
    if (arr.dtype != np.float32 or arr.shape != shape or not arr.flags.writeable
            or (arr.size and arr.strides[1] != 4)):
        raise ValueError(f"out must be a writable float32 array of shape {shape} with contiguous rows, "
                         f"got {arr.dtype} {arr.shape} strides {arr.strides}")
    return arr


def matmul(w, qtype: int, x: np.ndarray, out: np.ndarray) -> None:
    """out[n, rows] = x[n, cols] @ W.T for W stored as GGML type qtype (see module doc).

    x should be C-contiguous (a strided x is copied first); out may have strided rows."""
    w, cols = _weight_bytes(w, qtype)
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
        raise ValueError("x must be a float32 array [n, cols]")
    if x.shape[1] != cols:
        raise ValueError(f"x has {x.shape[1]} columns but the {type_name(qtype)} weights have {cols}")
    x = np.ascontiguousarray(x)
    out = _float_out(out, (x.shape[0], w.shape[0]))
    matvec = TYPES[qtype].matvec
    if x.shape[0] == 1 and matvec is not None:
        matvec(w, x[0], out[0], F16_TO_F32)
    elif x.shape[0] == 1:
        mv_float(w, qtype, x[0], out[0], F16_TO_F32)
    elif x.shape[0] > 1:
        gemm(w, qtype, x, out, F16_TO_F32)


def _int8_widths(kind: str, cols: int) -> tuple[int, int]:
    """(scales, sums) per activation row of `cols` values quantized in layout `kind`."""
    layout = LAYOUTS[kind]
    return cols // layout.block, cols // layout.sum_block


def int8_kind(qtype: int, cols: int) -> str | None:
    """The int8 activation layout `matmul_int8` needs for these weights ("q8k": blocks of 256,
    "q8_0": blocks of 32), or None if there is no int8 path for them."""
    row = TYPES.get(qtype)
    layout = row.int8 if row is not None and row.int8_block is not None else None
    return layout.name if layout is not None and cols % layout.block == 0 else None


def int8_ready(qtype: int, cols: int) -> bool:
    """Whether `matmul_int8` handles weights of this type and width."""
    return int8_kind(qtype, cols) is not None


class Int8Activations:
    """Activation rows quantized to int8 for `matmul_int8`, in one of two layouts: "q8k"
    (ggml's Q8_K: blocks of 256, float32 scale, int16 sums of every 16 values) or "q8_0"
    (ggml's Q8_0: blocks of 32, float16-valued scale, int16 block sums).

    Buffers are allocated once per shape and layout and reused: the result of `quantize`
    stays valid until the next `quantize` of the same shape and layout."""

    def __init__(self):
        self._buffers: dict[tuple, object] = {}

    def quantize(self, x: np.ndarray, kind: str = Q8K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(xq int8 [n, cols], scales float32 [n, cols/block], sums int16 [n, cols/sum]) of x [n, cols]."""
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
            raise ValueError("x must be a float32 array [n, cols]")
        if kind not in LAYOUTS:
            raise ValueError(f"unknown int8 activation layout {kind!r} (known: {', '.join(LAYOUTS)})")
        n, cols = x.shape
        block = LAYOUTS[kind].block
        if cols % block:
            raise ValueError(f"int8 activations need a multiple of {block} columns, got {cols}")
        bufs = self._buffers.get((n, cols, kind))
        if bufs is None:
            scales, sums = _int8_widths(kind, cols)
            bufs = (np.empty((n, cols), np.int8), np.empty((n, scales), np.float32), np.empty((n, sums), np.int16))
            self._buffers[n, cols, kind] = bufs
        LAYOUTS[kind].quantize(x if x.flags.c_contiguous else np.ascontiguousarray(x), *bufs)
        return bufs

    def float_rounded(self, x: np.ndarray, qtype: int) -> np.ndarray:
        """x rounded to the float grid llama.cpp multiplies `qtype` weights by (float16 for F16,
        bfloat16 for BF16; see the registry's float_activations), or x itself for other types
        (same reuse rule as quantize)."""
        rounder = TYPES[qtype].float_activations
        if rounder is None:
            return x
        out = self._buffers.get((x.shape, qtype, "float"))
        if out is None:
            out = self._buffers[x.shape, qtype, "float"] = np.empty(x.shape, np.float32)
        rounder(np.ascontiguousarray(x), out)
        return out

    def rounded(self, x: np.ndarray, kind: str) -> np.ndarray:
        """x rounded to its int8 grid, as float32 [n, cols]: what `matmul_int8` multiplies by,
        for a float32 matmul that should see the same activations (same reuse rule as quantize)."""
        q, d, _ = self.quantize(x, kind)
        out = self._buffers.get((x.shape, kind, "rounded"))
        if out is None:
            out = self._buffers[x.shape, kind, "rounded"] = np.empty(x.shape, np.float32)
        dequantize_q8(q, d, out)
        return out


class Int8Group:
    """Quantized weights that share one input (q/k/v, gate/up) and one int8 activation layout
    (`kind`), checked once, so each `matmul_int8_group` is one parallel launch with no per-call
    validation of the weights."""

    def __init__(self, mats, compile_types=()):
        """mats: [(w, qtype), ...] with equal column counts. compile_types: more GGML types to
        compile the group's mm_q8 kernel for (the model's other matrices' types), so that all
        of a model's groups share one compiled kernel (a first run compiles it once)."""
        ws, cols, kinds = [], set(), set()
        for w, qtype in mats:
            w, c = _weight_bytes(w, qtype)
            if not int8_ready(qtype, c):
                raise ValueError(f"no int8 matmul for {type_name(qtype)} weights with {c} columns")
            ws.append(w)
            cols.add(c)
            kinds.add(int8_kind(qtype, c))
        if len(cols) != 1:
            raise ValueError(f"weights in one int8 group must have equal column counts, got {sorted(cols)}")
        if len(kinds) != 1:
            raise ValueError(f"weights in one int8 group must share an activation layout, got {sorted(kinds)}")
        self.kind = kinds.pop()
        self.ws = tuple(ws)
        self.qtypes = tuple(qtype for _, qtype in mats)
        self.cols = cols.pop()
        # prompts run the matrices whose type has a panel decoder through the panel GEMM
        self.panel_idx = [i for i, qtype in enumerate(self.qtypes)
                          if _mm_panel.available and self.kind == Q8K and TYPES[qtype].panel is not None]
        self.rest_idx = [i for i in range(len(ws)) if i not in self.panel_idx]
        self._mm_q8_types = set(self.qtypes) | {t for t in compile_types if t in TYPES and TYPES[t].int8_block}
        self._panel_types = {self.qtypes[i] for i in self.panel_idx} | {
            t for t in compile_types if t in TYPES and TYPES[t].panel}
        # the kernels and their padded launch arguments, bound on the first launch (bind): a
        # kernel compiles, or loads from the cache, when it is first asked for
        self.all_launch = self.rest_launch = self.panel_kernel = None

    def bind(self) -> None:
        """Get this group's kernels (compiling them on a first run) and decide their launches."""
        kernel = mm_q8_for(self._mm_q8_types)
        self.panel_kernel = _mm_panel.mm_panels_for(self._panel_types) if self.panel_idx else None
        self.all_launch = (kernel, pad_launch(self.ws, self.qtypes))
        self.rest_launch = (kernel, pad_launch([self.ws[i] for i in self.rest_idx],
                                               [self.qtypes[i] for i in self.rest_idx]))

    @staticmethod
    def ready(mats) -> bool:
        """Whether every (w, qtype, cols) of mats can join an Int8Group."""
        return all(int8_ready(qtype, cols) for _, qtype, cols in mats)


def matmul_int8_group(group: Int8Group, xq: tuple[np.ndarray, np.ndarray, np.ndarray], outs) -> None:
    """outs[i][n, rows_i] = x @ W_i.T for each weight of the group and x quantized by
    `Int8Activations.quantize`."""
    q, d, sums = xq
    if q.shape[1] != group.cols:
        raise ValueError(f"x has {q.shape[1]} columns but the weights have {group.cols}")
    n_scales, n_sums = _int8_widths(group.kind, group.cols)
    if (q.dtype != np.int8 or d.dtype != np.float32 or sums.dtype != np.int16 or d.shape != (q.shape[0], n_scales)
            or sums.shape != (q.shape[0], n_sums)):
        raise ValueError(f"x is not quantized in the {group.kind!r} layout these weights need "
                         f"(Int8Activations.quantize(x, {group.kind!r}))")
    if len(outs) != len(group.ws):
        raise ValueError(f"{len(group.ws)} weights but {len(outs)} outputs")
    for w, out in zip(group.ws, outs):
        if (out.shape != (q.shape[0], w.shape[0]) or out.dtype != np.float32 or out.strides[1] != 4
                or not out.flags.writeable):
            _float_out(out, (q.shape[0], w.shape[0]))   # raises with the details
    _launch_int8(group, xq, outs)


PANEL_MIN_TOKENS = 6   # from this many rows the panel GEMM beats mm_q8 (measured on 1.5B shapes: even at 4, 1.3-1.8x at 6)
_panel_scratch: dict[int, tuple] = {}


def _launch_int8(group: Int8Group, xq, outs) -> None:
    """matmul_int8_group without the checks, for callers whose arguments are right by
    construction (matmul_group: the forward's own buffers; ~4 us a call, hundreds of calls a
    decode step). Prompts of PANEL_MIN_TOKENS rows or more run the panel GEMM where the
    weight type has one (kernels/_mm_panel.py), the rest mm_q8."""
    if group.all_launch is None:
        group.bind()
    if group.panel_idx and xq[0].shape[0] >= PANEL_MIN_TOKENS:
        scratch = _panel_scratch.get(group.cols)
        if scratch is None:   # per-thread panel buffers, kept for the next prompt of this width
            scratch = _panel_scratch[group.cols] = _mm_panel.scratch(group.cols, numba.config.NUMBA_NUM_THREADS)
        for i in group.panel_idx:   # one matrix a launch: one compiled signature, not one per group shape
            group.panel_kernel(group.ws[i], group.qtypes[i], *xq, outs[i], *scratch)
        if group.rest_idx:
            launch(*group.rest_launch, *xq, [outs[i] for i in group.rest_idx])
    else:
        launch(*group.all_launch, *xq, outs)


def matmul_int8(w, qtype: int, xq: tuple[np.ndarray, np.ndarray, np.ndarray], out: np.ndarray) -> None:
    """out[n, rows] = x @ W.T for weights of a type with an integer path (the registry's int8
    rows: every quantized type) and x quantized by
    `Int8Activations.quantize(x, int8_kind(qtype, cols))`.

    Each block's dot product is exact in integers; the result differs from `matmul`
    only by the int8 rounding of x (at most half a step, max|x_block|/254, per element)."""
    matmul_int8_many([(w, qtype, out)], xq)


def matmul_int8_many(mats, xq: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """`matmul_int8` for several (w, qtype, out) that share the input x, in one parallel launch."""
    matmul_int8_group(Int8Group([(w, qtype) for w, qtype, _ in mats]), xq, [out for _, _, out in mats])


def get_rows(w, qtype: int, ids: np.ndarray, out: np.ndarray) -> None:
    """Embedding lookup: out[i, :] = dequantized row ids[i] of W."""
    w, cols = _weight_bytes(w, qtype)
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"ids out of range [0, {w.shape[0]}): min {ids.min()}, max {ids.max()}")
    out = _float_out(out, (ids.shape[0], cols))
    dequantize_rows(w, qtype, ids.astype(np.int64, copy=False), out, F16_TO_F32)


def dequantize(w, qtype, shape) -> np.ndarray:
    """Test/debug helper: the whole of W as float32 [rows, cols]."""
    w, cols = _weight_bytes(w, qtype)
    if tuple(shape) != (w.shape[0], cols):
        raise ValueError(f"shape {tuple(shape)} does not match the weights' {(w.shape[0], cols)}")
    out = np.empty((w.shape[0], cols), np.float32)
    get_rows(w, qtype, np.arange(w.shape[0]), out)
    return out


class MatmulGroup:
    """Weight matrices that read one input (q/k/v, gate/up, a projection) and how each runs.

    The kernel choices are made here, once, from the registry: matrices with an integer path
    join one `Int8Group` per activation layout (x is quantized once per layout, each group is
    one parallel launch); for a prompt (two or more rows) against a layout whose integer kernel
    is the slower one (`Int8Layout.integer_prompts`), the batched float kernel gets x rounded to
    that int8 grid instead (the same values); matrices with no integer path run the float kernel
    on x rounded as llama.cpp rounds it for them (F16, BF16; the registry's float_activations),
    and all matrices run it on x as it is if `exact`; one-token matvecs of several 16-bit float
    matrices of one type share one launch. `float_prompts` runs the float kernel for prompts
    too: a prompt's lm_head is one row, free in float32, where int8 rounding would only add
    noise that llama.cpp's logits do not share."""

    def __init__(self, mats, exact: bool = False, float_prompts: bool = False, compile_types=()):
        """mats: [(w, qtype), ...], raw weight bytes [rows, row_bytes] and their GGML types.
        compile_types: the GGML types of the model's other matrices (see Int8Group)."""
        checked = [(_weight_bytes(w, qtype), qtype) for w, qtype in mats]
        self.mats = [(w, qtype) for (w, _), qtype in checked]
        by_kind: dict[str, list[int]] = {}
        self.float_idx = []
        for i, ((_, cols), qtype) in enumerate(checked):
            kind = None if exact else int8_kind(qtype, cols)
            if kind is None:
                self.float_idx.append(i)
            else:
                by_kind.setdefault(kind, []).append(i)
        self.groups = [(LAYOUTS[kind], Int8Group([mats[i] for i in idx], compile_types), idx)
                       for kind, idx in by_kind.items()]
        # one-token matvecs of two or more 16-bit float matrices of one type run in one launch
        halves: dict[int, list[int]] = {}
        for i in self.float_idx:
            if self.mats[i][1] in (F16, BF16):
                halves.setdefault(self.mats[i][1], []).append(i)
        self.half_groups = [(qtype, idx, tuple(self.mats[i][0] for i in idx)) for qtype, idx in halves.items()
                            if len(idx) > 1]
        grouped = {i for _, idx, _ in self.half_groups for i in idx}
        self.single_float_idx = [i for i in self.float_idx if i not in grouped]
        self.float_prompts = float_prompts
        self.exact = exact
        self.all_idx = range(len(mats))


def matmul_group(group: MatmulGroup, int8: Int8Activations, x: np.ndarray, outs, prompt: bool | None = None) -> None:
    """outs[i][n, rows_i] = x @ W_i.T for every matrix of the group, each by the kernel the group
    chose for it (see MatmulGroup); `int8` holds the caller's reusable int8 activation buffers.

    `prompt`: whether x comes from a prompt's forward (default: x has two or more rows). A
    prompt's lm_head reads one row, its last position's, and is still a prompt's."""
    prompt = x.shape[0] > 1 if prompt is None else prompt
    if prompt and group.float_prompts:
        for i in group.all_idx:
            matmul(group.mats[i][0], group.mats[i][1], x, outs[i])
        return
    for layout, int8_group, idx in group.groups:
        if prompt and not layout.integer_prompts:
            rounded = int8.rounded(x, layout.name)
            for i in idx:
                matmul(group.mats[i][0], group.mats[i][1], rounded, outs[i])
        else:
            group_outs = [outs[i] for i in idx]
            for w, out in zip(int8_group.ws, group_outs):
                if out.shape != (x.shape[0], w.shape[0]):   # the rest holds by construction (_launch_int8)
                    _float_out(out, (x.shape[0], w.shape[0]))
            _launch_int8(int8_group, int8.quantize(x, layout.name), group_outs)
    float_idx = group.float_idx
    if x.shape[0] == 1 and group.half_groups:
        float_idx = group.single_float_idx
        for qtype, idx, ws in group.half_groups:
            half_outs = tuple(outs[i] for i in idx)   # one row each: contiguous, one array type
            for w, out in zip(ws, half_outs):
                _float_out(out, (1, w.shape[0]))
            xr = x if group.exact else int8.float_rounded(x, qtype)
            mv_half_many(ws, qtype == BF16, np.ascontiguousarray(xr[0]), half_outs, F16_TO_F32)
    for i in float_idx:
        w, qtype = group.mats[i]
        matmul(w, qtype, x if group.exact else int8.float_rounded(x, qtype), outs[i])
