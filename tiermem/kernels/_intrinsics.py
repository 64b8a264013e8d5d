"""LLVM intrinsics exposed to Numba: software prefetch, half->float, fixed-width vectors.

The pooling kernels keep a pooled row in an ``F32Vec(D)`` (an LLVM ``<D x float>``
value: registers, not memory) when ``D`` is known at compile time; the width reaches
a kernel as a width token (:func:`width_token`). None of these check
bounds: callers pass validated rows.

Each intrinsic names a plain-Python stand-in with the same result (``_py_*``, numpy
arrays for ``F32Vec``): with ``NUMBA_DISABLE_JIT=1`` the kernels call it instead (Numba's
intrinsics cannot run in Python), and mypy reads the kernels' calls against its signature
(the call as a kernel writes it, without ``typingctx``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import intrinsic, register_model

from tiermem.kernels._flags import JIT_DISABLED

_I32 = ir.IntType(32)
#: llvm.prefetch locality of prefetch_bytes: 2 = prefetcht1 (see prefetch_bytes)
_PF_LOCALITY = 2

_P = ParamSpec("_P")
_R = TypeVar("_R")
#: what a kernel passes as an integer or a float (numpy scalars, Python numbers)
_Int = int | np.integer
_Float = float | np.floating


def _intrinsic(python: Callable[_P, _R]) -> Callable[[Callable[..., object]], Callable[_P, _R]]:
    """``@intrinsic`` with its Python stand-in: the stand-in itself when the JIT is off."""

    def wrap(defn: Callable[..., object]) -> Callable[_P, _R]:
        if JIT_DISABLED:
            return python
        # a kernel calls the intrinsic as it calls ``python`` (Numba's stubs type the call
        # from Python, which always raises)
        return cast(Callable[_P, _R], intrinsic(defn))

    return wrap


def _py_width(n: object) -> int:
    """The width an integer, a width token (:func:`width_token`) or a vector spells."""
    if isinstance(n, np.ndarray):
        return int(n.shape[0])
    if isinstance(n, tuple):
        return sum(1 << i for i, e in enumerate(n) if isinstance(e, float))
    return int(cast(int, n))


def _py_prefetch_row(arr: np.ndarray, row: _Int, col: _Int) -> None:
    """A prefetch is a hint: nothing to do."""


def _py_half_to_float(bits: _Int) -> np.float32:
    return np.float32(np.uint16(int(bits) & 0xFFFF).view(np.float16))


def _py_prefetch_bytes(arr: np.ndarray, row: _Int, byte_off: _Int) -> None:
    """A prefetch is a hint: nothing to do."""


def _py_vzero(n: object) -> np.ndarray:
    return np.zeros(_py_width(n), np.float32)


def _py_vadd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _py_vscale(a: np.ndarray, s: _Float) -> np.ndarray:
    return a * np.float32(s)


def _py_vload_row(arr: np.ndarray, row: _Int, n: object) -> np.ndarray:
    r = arr[row, :_py_width(n)]
    return (r.view(np.float16) if r.dtype == np.uint16 else r).astype(np.float32)


def _py_vstore_row(arr: np.ndarray, row: _Int, col: _Int, v: np.ndarray) -> None:
    arr[row, col:col + v.shape[0]] = v


def _py_data_address(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


def _py_atomic_fetch_add(arr: np.ndarray, idx: _Int, val: _Int) -> int:
    """Not atomic: with the JIT off a ``prange`` runs on the calling thread alone."""
    old = int(arr[idx])
    arr[idx] = old + val
    return old


def _py_atomic_exchange_2d(arr: np.ndarray, row: _Int, col: _Int, val: _Int) -> np.integer:
    old: np.integer = arr[row, col]
    arr[row, col] = val
    return old


def _py_vfma(acc: np.ndarray, x: np.ndarray, s: _Float) -> np.ndarray:
    """In float64 (``x * s`` exact there), rounded once more to float32: the fused result
    but for a tie of the double rounding (one unit in the last place)."""
    wide = acc.astype(np.float64) + x.astype(np.float64) * np.float64(np.float32(s))
    return wide.astype(np.float32)


def _py_vadd_scalar(a: np.ndarray, s: _Float) -> np.ndarray:
    return a + np.float32(s)


def _py_vload_row_i8(arr: np.ndarray, row: _Int, n: object) -> np.ndarray:
    return arr[row, :_py_width(n)].astype(np.float32)


def _py_load_pair(arr: np.ndarray, row: _Int) -> tuple[np.float32, np.float32]:
    return arr[row, 0], arr[row, 1]


@_intrinsic(_py_prefetch_row)
def prefetch_row(typingctx, arr, row, col):
    """Hint the CPU to load ``arr[row, col]`` into cache (``llvm.prefetch``).

    A prefetch never faults, so a stale address costs nothing but bandwidth;
    callers still pass only validated rows.
    """
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, aty, ary, [args[1], args[2]], wraparound=False, boundscheck=False
        )
        # one declaration per module serves every element type: pass an i8*
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # rw=0 (read), locality=3 (keep in all levels), cache type=1 (data)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row, col), codegen


@_intrinsic(_py_half_to_float)
def half_to_float(typingctx, bits):
    """IEEE binary16 bits (uint16) -> float32, exact (``fpext half``: F16C on x86)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@_intrinsic(_py_prefetch_bytes)
def prefetch_bytes(typingctx, arr, row, byte_off):
    """Prefetch the byte at ``&arr[row, 0] + byte_off`` (any C-contiguous 2-D array).

    Lets a kernel prefetch every 64-byte line a row spans, whatever the
    arena's alignment (``byte_off`` may be negative or past the row: a prefetch
    never faults). The hint is ``prefetcht1`` (into L2, locality 2): on a Xeon
    (Sapphire Rapids) it pooled random DRAM rows 1.2-1.5x faster than ``prefetcht0``,
    which holds an L1 fill buffer for the whole DRAM latency; ``prefetchnta`` was
    slower than both (bench/bench_sls.py measures the kernels on a given machine).
    """
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        row = context.cast(builder, args[1], sig.args[1], types.intp)
        off = context.cast(builder, args[2], sig.args[2], types.intp)
        ptr = cgutils.get_item_pointer(
            context, builder, aty, ary, [row, zero], wraparound=False, boundscheck=False
        )
        i8p = ir.IntType(8).as_pointer()
        bptr = builder.gep(builder.bitcast(ptr, i8p), [off], inbounds=False)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [bptr, ir.Constant(_I32, 0), ir.Constant(_I32, _PF_LOCALITY),
                          ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row, byte_off), codegen


# --- fixed-width float32 vectors ---------------------------------------------------------
#
# ``F32Vec(n)`` is an LLVM ``<n x float>`` value held in a Numba local: a pooled
# row of a width known at compile time lives in registers (LLVM splits it into
# 8-lane AVX registers) instead of in an array in memory. Only the few
# operations below exist; widths come in as integer literals.



class F32Vec(types.Type):
    """``<count x float>`` (compile-time width)."""

    def __init__(self, count: int) -> None:
        self.count = int(count)
        super().__init__(name=f"F32Vec({self.count})")


@register_model(F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.count))


#: bits of a width token (widths up to 1023)
_WIDTH_BITS = 10


def width_token(n: int) -> tuple[float | int, ...]:
    """A row width as a tuple whose element *types* spell it in binary (bit ``i`` set:
    a float, else an int): a kernel taking one is compiled (and cached) once per width,
    the width a compile-time constant inside. Numba's dispatcher types such a tuple in
    C (~0.2 us); a custom Python type took its Python fallback (~1.5 us a call), and an
    integer literal would not survive being passed into a parfor (prange) body."""
    n = int(n)
    if not 0 < n < (1 << _WIDTH_BITS):
        raise ValueError(f"width {n} out of range for a width token")
    return tuple(0.0 if (n >> i) & 1 else 0 for i in range(_WIDTH_BITS))


def token_width(t):
    """The width a Numba type of :func:`width_token` spells, or None (compile time)."""
    if not isinstance(t, (types.Tuple, types.UniTuple)) or len(t) != _WIDTH_BITS:
        return None
    if not all(isinstance(e, (types.Float, types.Integer)) for e in t.types):
        return None
    n = sum(1 << i for i, e in enumerate(t.types) if isinstance(e, types.Float))
    return n or None


def _literal_width(n):
    """Width from an integer literal, a width token or an ``F32Vec``."""
    if isinstance(n, F32Vec):
        return n.count
    if isinstance(n, types.BaseTuple):
        return token_width(n)
    if isinstance(n, types.IntegerLiteral) and n.literal_value > 0:
        return int(n.literal_value)
    return None


def _splat(builder, value, count):
    vty = ir.VectorType(ir.FloatType(), count)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, count), [0] * count))


@_intrinsic(_py_vzero)
def vzero(typingctx, n):
    """A zero ``F32Vec(n)`` (``n`` an integer literal or a width token)."""
    count = _literal_width(n)
    if count is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.VectorType(ir.FloatType(), count), [0.0] * count)

    return F32Vec(count)(n), codegen


@_intrinsic(_py_vadd)
def vadd(typingctx, a, b):
    """``a + b`` lane by lane."""
    if not (isinstance(a, F32Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@_intrinsic(_py_vscale)
def vscale(typingctx, a, s):
    """``a * s`` (``s`` a float32 scalar), lane by lane."""
    if not (isinstance(a, F32Vec) and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        sv = context.cast(builder, args[1], sig.args[1], types.float32)
        return builder.fmul(args[0], _splat(builder, sv, sig.args[0].count))

    return a(a, s), codegen


def _row_ptr(context, builder, aty, ary_val, row, rowty, col, colty):
    ary = context.make_array(aty)(context, builder, ary_val)
    r = context.cast(builder, row, rowty, types.intp)
    c = context.cast(builder, col, colty, types.intp)
    return cgutils.get_item_pointer(context, builder, aty, ary, [r, c], wraparound=False,
                                    boundscheck=False)


@_intrinsic(_py_vload_row)
def vload_row(typingctx, arr, row, n):
    """``arr[row, 0:n]`` as ``F32Vec(n)``: float32 as is, uint16 as IEEE half bits.

    No bounds or wraparound checks: the caller guarantees ``0 <= row < arr.shape[0]``,
    ``n <= arr.shape[1]`` and that each row is contiguous (C-contiguous array, or any
    row stride with the elements of a row adjacent).
    """
    count = _literal_width(n)
    if count is None or not isinstance(arr, types.Array) or arr.ndim != 2 or arr.layout == "F":
        return None
    kind = str(arr.dtype)
    if kind not in ("float32", "uint16"):
        return None

    def codegen(context, builder, sig, args):
        zero = context.get_constant(types.intp, 0)
        ptr = _row_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], zero,
                       types.intp)
        if kind == "float32":
            vty = ir.VectorType(ir.FloatType(), count)
            v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)
            return v
        vty = ir.VectorType(ir.HalfType(), count)
        v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=2)
        return builder.fpext(v, ir.VectorType(ir.FloatType(), count))

    return F32Vec(count)(arr, row, n), codegen


@_intrinsic(_py_vstore_row)
def vstore_row(typingctx, arr, row, col, v):
    """``arr[row, col:col + n] = v`` for a float32 C-contiguous 2-D ``arr`` (no checks)."""
    if not (isinstance(v, F32Vec) and isinstance(arr, types.Array) and arr.ndim == 2
            and arr.layout == "C" and str(arr.dtype) == "float32"):
        return None

    def codegen(context, builder, sig, args):
        ptr = _row_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], args[2],
                       sig.args[2])
        vty = ir.VectorType(ir.FloatType(), sig.args[3].count)
        builder.store(args[3], builder.bitcast(ptr, vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, row, col, v), codegen


@_intrinsic(_py_data_address)
def data_address(typingctx, arr):
    """The address of ``arr``'s first element, as an integer (for alignment tests)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, context.get_value_type(types.intp))

    return types.intp(arr), codegen


@_intrinsic(_py_atomic_fetch_add)
def atomic_fetch_add(typingctx, arr, idx, val):
    """``old = arr[idx]; arr[idx] += val`` atomically (int64 array); returns ``old``.

    Lets the threads of a parallel kernel hand out work dynamically.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64
            and isinstance(idx, types.Integer) and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i], wraparound=False,
                                       boundscheck=False)
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(arr, idx, val), codegen


@_intrinsic(_py_atomic_exchange_2d)
def atomic_exchange_2d(typingctx, arr, row, col, val):
    """``old = arr[row, col]; arr[row, col] = val`` atomically (int32/int64 2-D array); returns
    ``old``: of several threads writing the same value, exactly one sees another one."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2
            and arr.dtype in (types.int32, types.int64)
            and isinstance(row, types.Integer) and isinstance(col, types.Integer)
            and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        r = context.cast(builder, args[1], sig.args[1], types.intp)
        c = context.cast(builder, args[2], sig.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [r, c], wraparound=False,
                                       boundscheck=False)
        v = context.cast(builder, args[3], sig.args[3], aty.dtype)
        return builder.atomic_rmw("xchg", ptr, v, "seq_cst")

    return arr.dtype(arr, row, col, val), codegen


@_intrinsic(_py_vfma)
def vfma(typingctx, acc, x, s):
    """``acc + x * s`` lane by lane, with one rounding (``llvm.fma``; FMA3 on x86)."""
    if not (isinstance(acc, F32Vec) and acc == x and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(ir.FloatType(), sig.args[0].count)
        sv = _splat(builder, context.cast(builder, args[2], sig.args[2], types.float32),
                    sig.args[0].count)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                            f"llvm.fma.v{sig.args[0].count}f32")
        return builder.call(fn, [args[1], sv, args[0]])

    return acc(acc, x, s), codegen


@_intrinsic(_py_vadd_scalar)
def vadd_scalar(typingctx, a, s):
    """``a + s`` (``s`` a float32 scalar) lane by lane."""
    if not (isinstance(a, F32Vec) and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        sv = context.cast(builder, args[1], sig.args[1], types.float32)
        return builder.fadd(args[0], _splat(builder, sv, sig.args[0].count))

    return a(a, s), codegen


@_intrinsic(_py_vload_row_i8)
def vload_row_i8(typingctx, arr, row, n):
    """int8 ``arr[row, 0:n]`` converted to float (no scale/bias), no checks."""
    count = _literal_width(n)
    if count is None or not isinstance(arr, types.Array) or arr.ndim != 2 or arr.layout == "F":
        return None
    if str(arr.dtype) != "int8":
        return None

    def codegen(context, builder, sig, args):
        zero = context.get_constant(types.intp, 0)
        ptr = _row_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], zero,
                       types.intp)
        qty = ir.VectorType(ir.IntType(8), count)
        q = builder.load(builder.bitcast(ptr, qty.as_pointer()), align=1)
        return builder.sitofp(q, ir.VectorType(ir.FloatType(), count))

    return F32Vec(count)(arr, row, n), codegen


@_intrinsic(_py_load_pair)
def load_pair(typingctx, arr, row):
    """``(arr[row, 0], arr[row, 1])`` of a 2-D float32 array, no bounds/wraparound checks."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.dtype == types.float32
            and isinstance(row, types.Integer)):
        return None
    tup = types.UniTuple(types.float32, 2)

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        zero = context.get_constant(types.intp, 0)
        one = context.get_constant(types.intp, 1)
        p0 = _row_ptr(context, builder, aty, args[0], args[1], sig.args[1], zero, types.intp)
        p1 = _row_ptr(context, builder, aty, args[0], args[1], sig.args[1], one, types.intp)
        vals = [builder.load(p0, align=4), builder.load(p1, align=4)]
        return context.make_tuple(builder, tup, vals)

    return tup(arr, row), codegen
