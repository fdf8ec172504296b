"""Run llama.cpp (llama-cpp-python) over token ids and read its graph nodes with a ``cb_eval`` callback.

llama-cpp-python is an optional extra (``pip install '.[llamacpp]'``); nothing in the
core imports this module. ``LlamaGraph`` loads the model with llama.cpp's low-level C
API and makes one context whose ``decode(ids, pos0)`` runs ONE ``llama_decode`` (one
micro-batch, logits for every position, flash attention off, KV cache f16 as llama.cpp
defaults, kept between calls) and calls ``want(name, op)`` for every graph node before
it is computed (the scheduler's ``ask`` call) and ``take(node)`` after a wanted node
has been computed. ``run_graph`` is one such decode of all ids from position 0.

ggml's node struct is read with ctypes (``GGMLTensor``, the ``struct ggml_tensor``
of ggml 0.25.x, which llama-cpp-python 0.3.36 ships); the layout is checked against
libggml-base's own accessors on the first node, so a different ggml fails loudly
instead of reading garbage. Node values are converted to float32 in numpy order:
ggml ``ne[0]`` is the fastest dimension, so ``ne=[d0, d1, d2, d3]`` becomes
``[d3, d2, d1, d0]``.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import EngineError

INSTALL_HINT = ("llama.cpp capture needs llama-cpp-python, an optional extra: "
                "pip install '.[llamacpp]' (or pip install llama-cpp-python==0.3.36)")
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class LlamaCppMissing(EngineError):
    """llama-cpp-python is not installed."""


def import_llama_cpp():
    """The ``llama_cpp`` module, or LlamaCppMissing saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing(INSTALL_HINT) from None
    return llama_cpp


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml 0.25.x (GGML_MAX_DIMS 4, MAX_OP_PARAMS 64, MAX_SRC 10, MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass
class Node:
    """One computed graph node: ``name``, ``op`` (ggml_op_desc, e.g. ``MUL_MAT``, ``GLU:SWIGLU``),
    ``ne`` (ggml order), ``op_params`` (raw int32 words) and ``values`` (float32, numpy order, a copy)."""

    name: str
    op: str
    ne: tuple[int, int, int, int]
    op_params: tuple[int, ...]
    values: np.ndarray


def _ggml_base(llama_cpp):
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise EngineError(f"cannot find libggml-base next to llama_cpp in {lib_dir}")
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    return lib


def _read_values(t: GGMLTensor, nbytes: int) -> np.ndarray:
    """The node's values as float32 in numpy order (ne reversed), following its byte strides."""
    if t.type == GGML_TYPE_F32:
        dtype = np.dtype("<f4")
    elif t.type == GGML_TYPE_F16:
        dtype = np.dtype("<f2")
    else:
        raise EngineError(f"llama.cpp node {t.name.decode(errors='replace')} has ggml type {t.type}, "
                          "expected F32 or F16")
    if not t.data:
        raise EngineError(f"llama.cpp node {t.name.decode(errors='replace')} has no host data")
    shape = tuple(int(t.ne[i]) for i in reversed(range(4)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(4)))
    buf = (ctypes.c_uint8 * nbytes).from_address(t.data)
    return np.array(np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides), dtype=np.float32)


_LOG_CALLBACK = []


def _quiet_logs(llama_cpp) -> None:
    """Silence llama.cpp's console log (once per process; the callback must stay alive)."""
    if not _LOG_CALLBACK:
        _LOG_CALLBACK.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
        llama_cpp.llama_log_set(_LOG_CALLBACK[0], ctypes.c_void_p())


class LlamaGraph:
    """One llama.cpp model and context whose decodes report their graph nodes; a context manager.

    ``want(name, op) -> bool`` picks the nodes whose values ``take(Node)`` receives, in compute
    order, for every ``decode`` call. The context holds ``n_ctx_tokens`` positions (rounded up to
    a multiple of 256, at least 256) and one micro-batch of up to ``max(512, n_batch_tokens)``
    tokens, so a batch of that size is ONE graph. The KV cache persists between ``decode`` calls
    (one sequence, id 0), as in a generation; flash attention is off, so the ``kq`` /
    ``kq_soft_max`` nodes exist. Raises EngineError on llama.cpp failures.
    """

    def __init__(self, model_path, n_ctx_tokens: int, want, take, n_threads: int = 2,
                 n_batch_tokens: int | None = None):
        llama_cpp = import_llama_cpp()
        self._lib, ggml = llama_cpp, _ggml_base(llama_cpp)
        n_batch = n_ctx_tokens if n_batch_tokens is None else n_batch_tokens
        if n_ctx_tokens <= 0:
            raise EngineError("the prompt has no tokens; nothing to trace")
        if not 0 < n_batch <= n_ctx_tokens:
            raise EngineError(f"a batch of {n_batch} tokens does not fit a context of {n_ctx_tokens}")
        self._state = state = {"checked": False, "error": None}

        def callback(ptr, ask, _user):
            try:
                t = GGMLTensor.from_address(ptr)
                if not state["checked"]:
                    if (t.name.decode(errors="replace") != ggml.ggml_get_name(ptr).decode(errors="replace")
                            or int(np.prod([t.ne[i] for i in range(4)])) != ggml.ggml_nelements(ptr)):
                        raise EngineError("llama.cpp's ggml_tensor layout differs from the one this code reads "
                                          f"(llama-cpp-python {llama_cpp_version()}; expected 0.3.36)")
                    state["checked"] = True
                name = t.name.decode(errors="replace")
                op = ggml.ggml_op_desc(ptr).decode()
                if ask:
                    return bool(want(name, op))
                take(Node(name, op, tuple(int(x) for x in t.ne), tuple(int(x) for x in t.op_params),
                          _read_values(t, int(ggml.ggml_nbytes(ptr)))))
                return True
            except BaseException as e:  # never let an exception cross into C: stop the graph instead
                state["error"] = e
                return False

        self._cb = llama_cpp.ggml_backend_sched_eval_callback(callback)  # kept alive as long as the context
        _quiet_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_mmap = True
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {model_path}")
        self._ctx = self._batch = None
        try:
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = max(256, -(-n_ctx_tokens // 256) * 256)
            cparams.n_batch = cparams.n_ubatch = max(512, n_batch)
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = None
            cparams.no_perf = True
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise EngineError(f"llama.cpp could not create a context for {model_path}")
            self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
            self._n_batch, self._n_ctx = n_batch, n_ctx_tokens
        except BaseException:
            self.close()
            raise

    def decode(self, ids, pos0: int) -> None:
        """Decode ``ids`` at positions ``pos0 ..`` in one llama_decode, logits for every position; an
        exception raised by ``take`` stops the graph and propagates from here."""
        n = len(ids)
        if not 0 < n <= self._n_batch or not 0 <= pos0 <= self._n_ctx - n:
            raise EngineError(f"cannot decode {n} tokens at position {pos0} (batch {self._n_batch}, "
                              f"context {self._n_ctx})")
        batch = self._batch
        for i, tok in enumerate(ids):
            batch.token[i] = int(tok)
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if self._state["error"] is not None:
            error, self._state["error"] = self._state["error"], None
            raise error
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_graph(model_path, ids, want, take, n_threads: int = 2) -> None:
    """Decode ``ids`` from position 0 in one llama_decode; ``want(name, op) -> bool`` picks the nodes
    whose values ``take(Node)`` receives, in compute order. Raises EngineError on llama.cpp failures;
    an exception raised by ``take`` stops the graph and propagates."""
    if len(ids) == 0:
        raise EngineError("the prompt has no tokens; nothing to trace")
    with LlamaGraph(model_path, len(ids), want, take, n_threads=n_threads) as graph:
        graph.decode(ids, 0)
