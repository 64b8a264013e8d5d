"""LLVM intrinsics exposed to Numba: software prefetch and half->float."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I32 = ir.IntType(32)


@intrinsic
def prefetch_row(typingctx, arr, row, col):  # type: ignore[no-untyped-def]
    """Hint the CPU to load ``arr[row, col]`` into cache (``llvm.prefetch``).

    A prefetch never faults, so a stale address costs nothing but bandwidth;
    callers still pass only validated rows.
    """
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, aty, ary, [args[1], args[2]], wraparound=False, boundscheck=False
        )
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # rw=0 (read), locality=3 (keep in all levels), cache type=1 (data)
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row, col), codegen


@intrinsic
def half_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """IEEE binary16 bits (uint16) -> float32, exact (``fpext half``: F16C on x86)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen
