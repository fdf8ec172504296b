"""Quantized weights times int8 activations (llama.cpp's integer paths).

`row_dot`/`row_dot4` are one weight row's dot product against one or four int8
activation rows, as LLVM IR: a switch on the weight type to a loop over the row's
blocks, each block's exact integer dot product built by the type's IR in
kernels/_simd.py. The switch is derived from the registry (kernels/quants.py): a type
with an `int8_block` is reached here without editing this file. `mm_q8` is the
parallel matmul over them. (Numba's cache keys a kernel on its own source file: after
changing the registry or _simd.py, delete kernels/__pycache__/_mm_int8*.nb[ic].)
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._simd import _F32, _I64, _V8F32, _FAST, PREFETCH_AHEAD, _prefetch, _ptr
from kernels.quants import TYPES, QuantType

INT8_TYPES = tuple(t for t in TYPES.values() if t.int8_block is not None)
CHUNK = 16                                  # weight rows per parallel work item


def _row_loop(context, builder, arg_types, args, qt: QuantType, tokens: int):
    """IR for W_row . x_t over a whole row of blocks of type qt, for `tokens` activation rows;
    returns one float per token. Arguments as in row_dot: the type's int8 block IR turns each
    block into scaled 8-lane float partial sums, which are added into one accumulator per token
    and reduced once per row."""
    block_bytes, block_elems, block_fn = qt.block_bytes, qt.block_elems, qt.int8_block
    sums_per_block = block_elems // qt.int8.sum_block
    (trow, txq, txo, txs, txd, tdo, tds, tbs, tbo, tbst) = arg_types
    row_ary = context.make_array(trow)(context, builder, args[0])
    nblocks = builder.udiv(cgutils.unpack_tuple(builder, row_ary.shape, 1)[0],
                           ir.Constant(row_ary.shape.type.element, block_bytes))
    intp = lambda v, t: context.cast(builder, v, t, types.intp)  # noqa: E731
    xstride, dstride, bstride = intp(args[3], txs), intp(args[6], tds), intp(args[9], tbst)
    x0 = _ptr(context, builder, txq, args[1], txo, args[2])
    d0 = _ptr(context, builder, txd, args[4], tdo, args[5])
    b0 = _ptr(context, builder, tbs, args[7], tbo, args[8])
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8)) for _ in range(tokens)]
    with cgutils.for_range(builder, nblocks) as loop:
        b = loop.index

        def at(base, step, stride, t):   # element b*step + t*stride of an activation array
            return builder.gep(base, [builder.add(builder.mul(b, ir.Constant(b.type, step)),
                                                  builder.mul(stride, ir.Constant(_I64, t)))])
        blk = builder.gep(row_ary.data, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        if tokens == 1:
            for k in range(0, block_bytes, 64):
                _prefetch(builder, blk, PREFETCH_AHEAD + k)
        parts = block_fn(builder, blk, [at(x0, block_elems, xstride, t) for t in range(tokens)],
                         [at(b0, sums_per_block, bstride, t) for t in range(tokens)],
                         [builder.load(at(d0, 1, dstride, t)) for t in range(tokens)])
        for acc, part in zip(accs, parts):
            builder.store(builder.fadd(builder.load(acc), part, flags=_FAST), acc)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _V8F32]),
                                        "llvm.vector.reduce.fadd.v8f32")
    return [builder.call(fn, [ir.Constant(_F32, 0.0), builder.load(a)], fastmath=_FAST) for a in accs]


def _row_dot_codegen(tokens: int):
    """A switch on the weight type (a runtime value) to one _row_loop per type with an integer
    path; any other type gives NaN (callers pass only int8_ready types)."""
    def codegen(context, builder, signature, args):
        qtype = context.cast(builder, args[0], signature.args[0], types.int64)
        results = [cgutils.alloca_once(builder, _F32) for _ in range(tokens)]
        merge = builder.append_basic_block("row_dot.end")
        unknown = builder.append_basic_block("row_dot.unknown")
        switch = builder.switch(qtype, unknown)
        for qt in INT8_TYPES:
            case = builder.append_basic_block(f"row_dot.type{qt.id}")
            switch.add_case(ir.Constant(qtype.type, qt.id), case)
            with builder.goto_block(case):
                for res, value in zip(results, _row_loop(context, builder, signature.args[1:], args[1:], qt, tokens)):
                    builder.store(value, res)
                builder.branch(merge)
        with builder.goto_block(unknown):
            for res in results:
                builder.store(ir.Constant(_F32, float("nan")), res)
            builder.branch(merge)
        builder.position_at_end(merge)
        sums = [builder.load(r) for r in results]
        return sums[0] if tokens == 1 else context.make_tuple(builder, signature.return_type, sums)
    return codegen


def _row_dot_intrinsic(tokens: int, doc: str):
    def typer(typingctx, qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride):
        ret = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        return ret(qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride), _row_dot_codegen(tokens)
    typer.__doc__ = doc
    typer.__name__ = typer.__qualname__ = f"row_dot_{tokens}"
    return intrinsic(typer)


_ARGS = """Arguments (qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride): the weight row's
    GGML type and bytes; activation row t starts at xq[xo + t*xstride], its per-block scales at
    xd[do + t*dstride] and its sums (one per 16 values for 256-element blocks, one per block for
    32-element blocks) at bs[bo + t*bstride]."""
row_dot = _row_dot_intrinsic(1, "W_row . x for one activation row (a float).\n\n    " + _ARGS)
row_dot4 = _row_dot_intrinsic(4, "W_row . x_t for four activation rows t (a 4-tuple).\n\n    " + _ARGS)


@njit(cache=True, inline="always")
def _chunks(w):
    return (w.shape[0] + CHUNK - 1) // CHUNK


@njit(cache=True, inline="always")
def _locate(ws, job):
    """(matrix, chunk within it) of work item `job`, counting the matrices' chunks in order."""
    i, first = 0, 0
    while job >= first + _chunks(ws[i]):
        first += _chunks(ws[i])
        i += 1
    return i, job - first


# Work items are CHUNK weight rows of one of the matrices; inside one, activation rows go four at
# a time so each weight block is unpacked once per four tokens while the chunk's rows stay in cache.
# Several matrices that share an input (q/k/v, gate/up) run in one parallel launch.
@njit(cache=True, parallel=True)
def mm_q8(ws, qtypes, xq, xd, bs, outs):
    """outs[i][t, r] = ws[i][r] . x[t] for each matrix i (a tuple of row arrays, their types and
    outputs) and activations quantized for those types (quantize_q8k or quantize_q8_0)."""
    n = xq.shape[0]
    xs, ds, bst = xq.shape[1], xd.shape[1], bs.shape[1]
    total = 0
    for i in range(len(ws)):
        total += _chunks(ws[i])
    for job in prange(total):
        i, c = _locate(ws, job)
        w, qtype, out = ws[i], qtypes[i], outs[i]
        r0, r1 = c * CHUNK, min(w.shape[0], c * CHUNK + CHUNK)
        for t in range(0, n - 3, 4):
            for r in range(r0, r1):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = row_dot4(
                    qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
        for t in range(n - n % 4, n):
            for r in range(r0, r1):
                out[t, r] = row_dot(qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
