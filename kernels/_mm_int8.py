"""Quantized weights times int8 activations (llama.cpp's integer paths).

`row_dot`/`row_dot4` are one weight row's dot product against one or four int8
activation rows, as LLVM IR: a switch on the weight type to a loop over the row's
blocks, each block's exact integer dot product built by the type's IR in
kernels/_simd.py. The switch is derived from the registry (kernels/quants.py): a type
with an `int8_block` is reached here without editing this file. `rows_dot` is four weight
rows against one activation row, what a decode step runs. `mm_q8` is the parallel
matmul over them, compiled per set of weight types (`mm_q8_for`): the switch holds only
the types a model uses, which keeps a first run's compile to what it needs. (A kernel
cache made from other sources of this package is cleared at import: kernels/__init__.py.)
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._matvec import chunks_of, locate_chunk
from kernels._simd import (_I64, _V8F32, _V16F32, _FAST, HAS_PAIRS, PREFETCH_AHEAD, _prefetch, _ptr, _shuffle,
                           literal_mask, reduce_fadd,
                           type_switch, types_mask)
from kernels.quants import TYPES, QuantType

INT8_TYPES = tuple(t for t in TYPES.values() if t.int8_block is not None)
CHUNK = 16                                  # weight rows per parallel work item


def _blocks_loop(context, builder, qt: QuantType, rows, nblocks, acts, tokens: int):
    """IR for W_r . x_t for every weight row r (byte pointers `rows`, `nblocks` blocks of type
    qt each) and every one of `tokens` activation rows; returns [row][token] floats.

    acts = (x0, xstride, d0, dstride, b0, bstride): pointers to token 0's int8 values, scales and
    sums, and the strides between tokens. The type's int8 block IR turns each block into scaled
    8-lane float partial sums, added into one accumulator per (row, token) and reduced once at
    the end. Several rows per loop give independent addition chains (one chain waits on the
    float add's latency, four blocks in flight do not) and load each activation block once.
    One token (a decode step) of a type with a pair IR (`int8_pair`) takes its blocks two at a
    time in 512-bit vectors where the CPU has them (HAS_PAIRS), the odd last block alone."""
    block_bytes, block_elems, block_fn = qt.block_bytes, qt.block_elems, qt.int8_block
    sums_per_block = block_elems // qt.int8.sum_block
    x0, xstride, d0, dstride, b0, bstride = acts
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8)) for _ in range(tokens)]
            for _ in rows]
    first = ir.Constant(nblocks.type, 0)
    pair = qt.int8_pair if tokens == 1 and HAS_PAIRS else None
    if pair is not None:
        pair_accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in rows]
        npairs = builder.udiv(nblocks, ir.Constant(nblocks.type, 2))
        with cgutils.for_range(builder, npairs) as loop:
            b = builder.mul(loop.index, ir.Constant(loop.index.type, 2))
            xp = builder.gep(x0, [builder.mul(b, ir.Constant(b.type, block_elems))])
            bp = builder.gep(b0, [builder.mul(b, ir.Constant(b.type, sums_per_block))])
            xdp = builder.gep(d0, [b])
            for row, acc in zip(rows, pair_accs):
                blk = builder.gep(row, [builder.mul(b, ir.Constant(b.type, block_bytes))])
                for k in range(0, 2 * block_bytes, 64):
                    _prefetch(builder, blk, PREFETCH_AHEAD + k)
                builder.store(builder.fadd(builder.load(acc), pair(builder, blk, xp, bp, xdp), flags=_FAST), acc)
        first = builder.mul(npairs, ir.Constant(nblocks.type, 2))
    with cgutils.for_range(builder, builder.sub(nblocks, first)) as loop:
        b = builder.add(loop.index, first)

        def at(base, step, stride, t):   # element b*step + t*stride of an activation array
            return builder.gep(base, [builder.add(builder.mul(b, ir.Constant(b.type, step)),
                                                  builder.mul(stride, ir.Constant(_I64, t)))])
        xps = [at(x0, block_elems, xstride, t) for t in range(tokens)]
        bps = [at(b0, sums_per_block, bstride, t) for t in range(tokens)]
        xds = [builder.load(at(d0, 1, dstride, t)) for t in range(tokens)]
        for row, row_accs in zip(rows, accs):
            blk = builder.gep(row, [builder.mul(b, ir.Constant(b.type, block_bytes))])
            if tokens == 1:   # one token reads each weight byte once: stream it in ahead of use
                for k in range(0, block_bytes, 64):
                    _prefetch(builder, blk, PREFETCH_AHEAD + k)
            for acc, part in zip(row_accs, block_fn(builder, blk, xps, bps, xds)):
                builder.store(builder.fadd(builder.load(acc), part, flags=_FAST), acc)
    if pair is not None:   # fold each row's 16 pair lanes into its 8 single-block lanes
        for (acc,), pacc in zip(accs, pair_accs):
            wide = builder.load(pacc)
            halves = builder.fadd(_shuffle(builder, wide, range(8)), _shuffle(builder, wide, range(8, 16)), flags=_FAST)
            builder.store(builder.fadd(builder.load(acc), halves, flags=_FAST), acc)
    return [[reduce_fadd(builder, builder.load(a)) for a in row_accs] for row_accs in accs]


def _acts(context, builder, arg_types, args):
    """The activation arguments (xq, xo, xstride, xd, do, dstride, bs, bo, bstride) as pointers
    and strides for _blocks_loop."""
    (txq, txo, txs, txd, tdo, tds, tbs, tbo, tbst) = arg_types
    intp = lambda v, t: context.cast(builder, v, t, types.intp)  # noqa: E731
    return (_ptr(context, builder, txq, args[0], txo, args[1]), intp(args[2], txs),
            _ptr(context, builder, txd, args[3], tdo, args[4]), intp(args[5], tds),
            _ptr(context, builder, tbs, args[6], tbo, args[7]), intp(args[8], tbst))


ALL_INT8 = types_mask(t.id for t in INT8_TYPES)   # every type with an integer path


def _switch(builder, qtype, mask: int, n_results: int, emit):
    """type_switch over the int8 types of `mask`."""
    return type_switch(builder, qtype, [t for t in INT8_TYPES if mask >> t.id & 1], emit, n_results)


def _row_dot_codegen(tokens: int, mask: int):
    """One weight row (a 1-D byte array) against `tokens` activation rows."""
    def codegen(context, builder, signature, args):
        qtype = context.cast(builder, args[1], signature.args[1], types.int64)
        row_ary = context.make_array(signature.args[2])(context, builder, args[2])
        row_bytes = cgutils.unpack_tuple(builder, row_ary.shape, 1)[0]
        acts = _acts(context, builder, signature.args[3:], args[3:])

        def emit(qt):
            nblocks = builder.udiv(row_bytes, ir.Constant(row_bytes.type, qt.block_bytes))
            return _blocks_loop(context, builder, qt, [row_ary.data], nblocks, acts, tokens)[0]
        sums = _switch(builder, qtype, mask, tokens, emit)
        return sums[0] if tokens == 1 else context.make_tuple(builder, signature.return_type, sums)
    return codegen


def _row_dot_intrinsic(tokens: int, doc: str):
    def typer(typingctx, kinds, qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride):
        mask = literal_mask(kinds)
        if mask is None:
            return None
        ret = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        return (ret(kinds, qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride),
                _row_dot_codegen(tokens, mask))
    typer.__doc__ = doc
    typer.__name__ = typer.__qualname__ = f"row_dot_{tokens}"
    return intrinsic(typer)


_ARGS = """Arguments (kinds, qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride): kinds, a
    constant types mask (bit t for type id t: only those types' code is compiled in); the weight row's
    GGML type and bytes; activation row t starts at xq[xo + t*xstride], its per-block scales at
    xd[do + t*dstride] and its sums (one per 16 values for 256-element blocks, one per block for
    32-element blocks) at bs[bo + t*bstride]."""
row_dot = _row_dot_intrinsic(1, "W_row . x for one activation row (a float).\n\n    " + _ARGS)
row_dot4 = _row_dot_intrinsic(4, "W_row . x_t for four activation rows t (a 4-tuple).\n\n    " + _ARGS)

ROWS = 4   # weight rows per rows_dot


def _rows_dot_codegen(mask: int):
    def codegen(context, builder, signature, args):
        qtype = context.cast(builder, args[1], signature.args[1], types.int64)
        w = context.make_array(signature.args[2])(context, builder, args[2])
        r = context.cast(builder, args[3], signature.args[3], types.intp)
        stride = cgutils.unpack_tuple(builder, w.strides, 2)[0]          # bytes from row to row
        row_bytes = cgutils.unpack_tuple(builder, w.shape, 2)[1]
        first = builder.gep(w.data, [builder.mul(r, stride)])
        rows = [builder.gep(first, [builder.mul(ir.Constant(stride.type, i), stride)]) for i in range(ROWS)]
        acts = _acts(context, builder, signature.args[4:], args[4:])

        def emit(qt):
            nblocks = builder.udiv(row_bytes, ir.Constant(row_bytes.type, qt.block_bytes))
            return [res[0] for res in _blocks_loop(context, builder, qt, rows, nblocks, acts, 1)]
        sums = _switch(builder, qtype, mask, ROWS, emit)
        return context.make_tuple(builder, signature.return_type, sums)
    return codegen


@intrinsic
def rows_dot(typingctx, kinds, qtype, w, r, xq, xo, xstride, xd, do, dstride, bs, bo, bstride):
    """(W[r + i] . x for i < ROWS) for one activation row: a ROWS-tuple. w is a 2-D byte array
    with rows r .. r+ROWS-1 (unchecked: callers stay in range); other arguments as in row_dot."""
    mask = literal_mask(kinds)
    if mask is None:
        return None
    sig = types.UniTuple(types.float32, ROWS)(kinds, qtype, w, r, xq, xo, xstride, xd, do, dstride, bs, bo, bstride)
    return sig, _rows_dot_codegen(mask)


# Work items are CHUNK weight rows of one of the matrices; inside one, activation rows go four at
# a time so each weight block is unpacked once per four tokens while the chunk's rows stay in cache.
# Several matrices that share an input (q/k/v, gate/up) run in one parallel launch.
MAX_MATS = 3   # matrices per launch (q/k/v); fewer are padded to it (pad_launch)
_OUT = types.Array(types.float32, 2, "A")
# The one signature every mm_q8 kernel is compiled for: MAX_MATS matrices, outputs of any
# strides (the column slices of a prompt's fused q/k/v buffer, C-contiguous buffers elsewhere,
# converted at the call). Compiled lazily per argument types, each group size and output
# layout was a kernel of its own: three full compiles of this kernel on a first run.
MM_Q8_SIGNATURE = types.void(types.UniTuple(types.Array(types.uint8, 2, "C", readonly=True), MAX_MATS),
                             types.UniTuple(types.int64, MAX_MATS), types.Array(types.int8, 2, "C"),
                             types.Array(types.float32, 2, "C"), types.Array(types.int16, 2, "C"),
                             types.UniTuple(_OUT, MAX_MATS))
_NO_WEIGHT = np.zeros((0, 1), np.uint8)      # a padding matrix: no rows, so no work items
_NO_OUT = np.zeros((0, 0), np.float32)
_OUT_PADS = {k: (_NO_OUT,) * (MAX_MATS - k) for k in range(MAX_MATS + 1)}   # outputs for k matrices: + _OUT_PADS[k]


def pad_launch(ws, qtypes) -> list[tuple]:
    """(weights, types) tuples of MAX_MATS each for mm_q8 kernels (`launch`): the matrices in
    groups of MAX_MATS, the last padded with matrices of no rows."""
    ws, qtypes = tuple(ws), tuple(int(t) for t in qtypes)
    launches = []
    for i in range(0, len(ws), MAX_MATS):
        pad = MAX_MATS - len(ws[i:i + MAX_MATS])
        launches.append((ws[i:i + MAX_MATS] + (_NO_WEIGHT,) * pad, qtypes[i:i + MAX_MATS] + (qtypes[i],) * pad))
    return launches


def launch(kernel, launches, xq, xd, bs, outs) -> None:
    """Run an mm_q8 kernel over pad_launch's `launches` and the matrices' outputs: one parallel
    launch per MAX_MATS matrices (one for every group the forward has), outputs padded to match."""
    if len(launches) == 1:   # the forward's case, a few hundred times a decode step: no slicing
        kernel(launches[0][0], launches[0][1], xq, xd, bs, tuple(outs) + _OUT_PADS[len(outs)])
        return
    for i, (ws, qtypes) in enumerate(launches):
        part = outs[i * MAX_MATS:(i + 1) * MAX_MATS]
        kernel(ws, qtypes, xq, xd, bs, tuple(part) + _OUT_PADS[len(part)])


@functools.cache
def _mm_q8_kernel(kinds: int):
    """mm_q8 compiled for the types of mask `kinds` only, for MM_Q8_SIGNATURE only (compiled
    when this is first called). kinds is a closure constant: Numba types it as a literal, and
    its cache keys each closure on the values it captures, so every types mask gets its own
    cached kernel (a first run compiles the model's types, not all of them)."""
    @njit([MM_Q8_SIGNATURE], cache=True, parallel=True)
    def mm_q8_of(ws, qtypes, xq, xd, bs, outs):
        n = xq.shape[0]
        xs, ds, bst = xq.shape[1], xd.shape[1], bs.shape[1]
        total = 0
        for i in range(len(ws)):
            total += chunks_of(ws[i], CHUNK)
        for job in prange(total):
            i, c = locate_chunk(ws, job, CHUNK)
            w, qtype, out = ws[i], qtypes[i], outs[i]
            r0, r1 = c * CHUNK, min(w.shape[0], c * CHUNK + CHUNK)
            for t in range(0, n - 3, 4):
                for r in range(r0, r1):
                    out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = row_dot4(
                        kinds, qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
            for t in range(n - n % 4, n):
                for r in range(r0, r1 - (r1 - r0) % ROWS, ROWS):
                    dots = rows_dot(kinds, qtype, w, r, xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
                    for i in range(ROWS):
                        out[t, r + i] = dots[i]
                for r in range(r1 - (r1 - r0) % ROWS, r1):
                    out[t, r] = row_dot(kinds, qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
    return mm_q8_of


def mm_q8_for(qtypes):
    """The mm_q8 kernel for matrices of these GGML types (any iterable of type ids with an
    integer path), compiled (or loaded from the cache) on first use; it takes MAX_MATS
    matrices (pad_launch). Callers that launch often keep it (Int8Group)."""
    kinds = types_mask(qtypes)
    if kinds & ~ALL_INT8:
        raise ValueError(f"no integer path for types mask {kinds & ~ALL_INT8:#x}")
    return _mm_q8_kernel(kinds)


def mm_q8(ws, qtypes, xq, xd, bs, outs):
    """outs[i][t, r] = ws[i][r] . x[t] for each matrix i (a tuple of row arrays, their types and
    outputs) and activations quantized for those types (quantize_q8k or quantize_q8_0)."""
    launch(mm_q8_for(qtypes), pad_launch(ws, qtypes), xq, xd, bs, outs)
