"""Non-temporal ("streaming") vector stores for the element-wise passes' outputs.

A plain store to a line that is not in cache first reads the line (the
read-for-ownership), then leaves it in cache, where it evicts the inputs. A
non-temporal store writes the line straight to memory: once the output is too
large to be read back from cache anyway, that saves a fifth of the backward's
element-wise traffic (it reads ``dy`` and ``x``) and a third of the forward's.
Numba cannot ask for such a store, so the intrinsics here emit the LLVM IR
themselves: each computes one 32-byte vector of the output and stores it with
``!nontemporal`` metadata, at an address that must be 32-byte aligned (the
kernels peel scalar values until it is). Non-temporal stores are weakly
ordered: a slab ends with ``store_fence()`` before its thread reports that it
is done.
"""

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
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
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _load(context, builder, array_type, array, index, vector_type):
    """``array[index : index + lanes]`` (1-D, contiguous) as one vector, unaligned."""
    data = context.make_array(array_type)(context, builder, array).data
    pointer = builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())
    return builder.load(pointer, align=array_type.dtype.bitwidth // 8)


def _streamed(inputs, expression):
    """The codegen of ``out[i : i + lanes] = expression(inputs..., per-feature rows...)``, stored non-temporally.

    Arguments: ``out, i, c``; then ``inputs`` flat arrays read at ``i``; then
    the per-feature rows, read at feature ``c``.
    """

    def codegen(context, builder, signature, args):
        out_type = signature.args[0]
        vector_type = ir.VectorType(context.get_value_type(out_type.dtype), VECTOR_BYTES * 8 // out_type.dtype.bitwidth)
        out, i, c = args[:3]
        operands = [
            _load(context, builder, kind, value, i if n < inputs else c, vector_type)
            for n, (kind, value) in enumerate(zip(signature.args[3:], args[3:]))
        ]
        data = context.make_array(out_type)(context, builder, out).data
        pointer = builder.bitcast(builder.gep(data, [i]), vector_type.as_pointer())
        store = builder.store(expression(builder, *operands), pointer, align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return codegen


def _normalized(b, x, hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, hi, flags=_FLAGS), scale, flags=_FLAGS), shift, flags=_FLAGS)


def _input_gradient(b, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    xhat = b.fmul(b.fsub(x, hi, flags=_FLAGS), invstd, flags=_FLAGS)
    scaled = b.fsub(b.fmul(dy, dy_scale, flags=_FLAGS), b.fmul(xhat, xhat_scale, flags=_FLAGS), flags=_FLAGS)
    return b.fsub(scaled, offset, flags=_FLAGS)


@intrinsic
def stream_normalize(typingctx, y, i, c, x, hi, scale, shift):
    """``y[i:i+lanes] = (x - hi) * scale + shift``, as ``_kernels._slab_normalize``; ``y[i]`` 32-byte aligned.

    ``y`` and ``x`` are flat and read at ``i``; the per-feature rows are read
    at feature ``c`` (consecutive values of ``(N, C)`` rows are consecutive
    features, and the rows are padded past the last feature: ``_kernels.PARAMS_PAD``).
    """
    return types.void(y, i, c, x, hi, scale, shift), _streamed(1, _normalized)


@intrinsic
def stream_grad_input(typingctx, dx, i, c, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    """``dx[i:i+lanes] = dy * dy_scale - ((x - hi) * invstd) * xhat_scale - offset``; ``dx[i]`` 32-byte aligned.

    As ``_kernels._slab_grad_input``, operation for operation; arguments as
    for ``stream_normalize``.
    """
    return types.void(dx, i, c, dy, x, hi, invstd, dy_scale, xhat_scale, offset), _streamed(2, _input_gradient)
