"""Non-temporal ("streaming") vector stores for the backward's ``dx``.

A plain store to a line that is not in cache first reads the line (the
read-for-ownership), then leaves it in cache, where it evicts the inputs. A
non-temporal store writes the line straight to memory. For the backward's
element-wise pass, which reads ``dy`` and ``x`` and writes ``dx``, that is a
fifth less traffic, once ``dx`` is too large to be read back from cache anyway.
Numba cannot ask for such a store, so ``stream_grad_input`` emits the LLVM IR
itself: one 32-byte vector of ``dx``, stored with ``!nontemporal`` metadata at
an address that must be 32-byte aligned (the kernel peels scalar values until
it is). Non-temporal stores are weakly ordered: a slab ends with
``store_fence()`` before its thread reports that it is done.
"""

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

VECTOR_BYTES = 32  # one AVX register; on narrower targets LLVM splits the store
_FLAGS = ("contract",)  # as the scalar kernels: multiply and add may fuse


@intrinsic
def address(typingctx, array):
    """The address of ``array``'s first value, as an integer."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(array), codegen


@intrinsic
def store_fence(typingctx):
    """Order every earlier non-temporal store before any later store.

    On x86 that takes ``sfence``: LLVM's sequentially consistent fence becomes
    a locked instruction there, which does not order non-temporal stores.
    Elsewhere (aarch64) that fence is a full barrier, non-temporal stores included.
    """

    def codegen(context, builder, signature, args):
        if platform.machine().lower() in ("x86_64", "amd64"):
            sfence = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []), name="llvm.x86.sse.sfence")
            builder.call(builder.module.globals.get(sfence.name, sfence), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _load(context, builder, array_type, array, index, vector_type):
    """``array[index : index + lanes]`` (1-D, contiguous) as one vector, unaligned."""
    data = context.make_array(array_type)(context, builder, array).data
    pointer = builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())
    return builder.load(pointer, align=array_type.dtype.bitwidth // 8)


@intrinsic
def stream_grad_input(typingctx, dx, i, c, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    """``dx[i:i+lanes] = dy * dy_scale - ((x - hi) * invstd) * xhat_scale - offset``, stored non-temporally.

    ``dx``, ``dy`` and ``x`` are flat and read at ``i``; the per-feature rows
    ``hi`` .. ``offset`` are read at feature ``c`` (consecutive values of
    ``(N, C)`` rows are consecutive features, and the rows are padded past the
    last feature: ``_kernels.PARAMS_PAD``). The expression is
    ``_kernels._slab_grad_input``'s, operation for operation. ``dx[i]`` must
    be 32-byte aligned.
    """
    signature = types.void(dx, i, c, dy, x, hi, invstd, dy_scale, xhat_scale, offset)

    def codegen(context, builder, signature, args):
        dx_type = signature.args[0]
        vector_type = ir.VectorType(context.get_value_type(dx_type.dtype), VECTOR_BYTES * 8 // dx_type.dtype.bitwidth)
        dx_value, i, c = args[:3]
        grad, values = (_load(context, builder, t, a, i, vector_type) for t, a in zip(signature.args[3:5], args[3:5]))
        hi, invstd, dy_scale, xhat_scale, offset = (
            _load(context, builder, t, a, c, vector_type) for t, a in zip(signature.args[5:], args[5:])
        )
        xhat = builder.fmul(builder.fsub(values, hi, flags=_FLAGS), invstd, flags=_FLAGS)
        scaled = builder.fsub(builder.fmul(grad, dy_scale, flags=_FLAGS), builder.fmul(xhat, xhat_scale, flags=_FLAGS), flags=_FLAGS)
        result = builder.fsub(scaled, offset, flags=_FLAGS)
        data = context.make_array(dx_type)(context, builder, dx_value).data
        pointer = builder.bitcast(builder.gep(data, [i]), vector_type.as_pointer())
        store = builder.store(result, pointer, align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return signature, codegen
