"""Explicit vector operations for the element-wise passes over ``(N, C)`` rows.

Each intrinsic computes one 32-byte vector of the output (a ``*_rows`` one, one
vector in each of ``ROWS`` rows) from vectors of the inputs and of the
per-feature rows, then stores it, at an address that must be 32-byte aligned
(the kernels peel scalar values until it is). Numba cannot express either part:

- The store may be non-temporal (``!nontemporal`` metadata). A plain store
  to a line that is not in cache first reads the line (the read-for-ownership),
  then leaves it in cache, where it evicts the inputs. A non-temporal store
  writes the line straight to memory: once the output is too large to be read
  back from cache anyway, that saves a fifth of the backward's element-wise
  traffic (it reads ``dy`` and ``x``) and a third of the forward's.
  Non-temporal stores are weakly ordered: a slab that made them ends with
  ``store_fence()`` before its thread reports that it is done.
- A vector of ``(N, C)`` values spans whatever features it covers, across the
  end of a row, so that rows of 3 or 17 features vectorize as well as rows of
  1024 (1.6-3.8x faster than a loop over each row's features). And the loads come
  before the store, so the output may be an input: a compiled loop given two
  arrays checks whether they overlap, and runs its scalar version if they do.
"""

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._config import FASTMATH

VECTOR_BYTES = 32  # one AVX register; on narrower targets LLVM splits the store
# As the scalar kernels: multiply and add may fuse, unless NUMBANORM_FASTMATH=0.
_FLAGS = ("contract",) if FASTMATH else ()


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


def _vector_op(inputs, expression, rows=1):
    """The codegen of ``out[i : i + lanes] = expression(inputs..., per-feature rows...)``.

    Arguments: ``out, i, c, nontemporal``; then ``inputs`` flat arrays read at
    ``i``; then the per-feature rows, read at feature ``c``. All loads come
    before the store, so ``out`` may be one of the inputs. ``nontemporal``
    picks the store at run time (a branch per vector, which always goes the
    same way), so one compiled loop serves both stores.

    With ``rows > 1``, a ``stride`` follows ``i``: the vectors at ``i``,
    ``i + stride``, ... (``rows`` of them, the same features of consecutive
    rows) share one load of the per-feature rows, and are all loaded before
    any is stored.
    """
    fixed = 4 if rows == 1 else 5

    def codegen(context, builder, signature, args):
        out_type = signature.args[0]
        vector_type = ir.VectorType(context.get_value_type(out_type.dtype), VECTOR_BYTES * 8 // out_type.dtype.bitwidth)
        out, i, *rest = args[:fixed]
        stride, c, nontemporal = rest if rows > 1 else [None, *rest]
        starts = [i] + [builder.add(i, builder.mul(stride, ir.Constant(ir.IntType(64), r))) for r in range(1, rows)]
        kinds, values = signature.args[fixed:], args[fixed:]
        operands = [
            [_load(context, builder, kind, value, start, vector_type) for kind, value in zip(kinds[:inputs], values[:inputs])]
            for start in starts
        ]
        per_feature = [_load(context, builder, kind, value, c, vector_type) for kind, value in zip(kinds[inputs:], values[inputs:])]
        results = [expression(builder, *row, *per_feature) for row in operands]
        data = context.make_array(out_type)(context, builder, out).data
        pointers = [builder.bitcast(builder.gep(data, [start]), vector_type.as_pointer()) for start in starts]
        with builder.if_else(nontemporal) as (streamed, plain):
            with streamed:
                for pointer, result in zip(pointers, results):
                    store = builder.store(result, pointer, align=VECTOR_BYTES)
                    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            with plain:
                for pointer, result in zip(pointers, results):
                    builder.store(result, pointer, align=VECTOR_BYTES)
        return context.get_dummy_value()

    return codegen


def _normalized(b, x, hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, hi, flags=_FLAGS), scale, flags=_FLAGS), shift, flags=_FLAGS)


def _input_gradient(b, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    xhat = b.fmul(b.fsub(x, hi, flags=_FLAGS), invstd, flags=_FLAGS)
    scaled = b.fsub(b.fmul(dy, dy_scale, flags=_FLAGS), b.fmul(xhat, xhat_scale, flags=_FLAGS), flags=_FLAGS)
    return b.fsub(scaled, offset, flags=_FLAGS)


@intrinsic
def vector_normalize(typingctx, y, i, c, nontemporal, x, hi, scale, shift):
    """``y[i:i+lanes] = (x - hi) * scale + shift``, as ``_kernels._slab_normalize``; ``y[i]`` 32-byte aligned.

    ``y`` and ``x`` are flat and read at ``i``; the per-feature rows are read
    at feature ``c`` (consecutive values of ``(N, C)`` rows are consecutive
    features, and the rows are padded past the last feature: ``_kernels.PARAMS_PAD``).
    ``nontemporal``: store with a non-temporal store.
    """
    return types.void(y, i, c, nontemporal, x, hi, scale, shift), _vector_op(1, _normalized)


@intrinsic
def vector_grad_input(typingctx, dx, i, c, nontemporal, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    """``dx[i:i+lanes] = dy * dy_scale - ((x - hi) * invstd) * xhat_scale - offset``; ``dx[i]`` 32-byte aligned.

    As ``_kernels._slab_grad_input``, operation for operation; arguments as
    for ``vector_normalize``.
    """
    return types.void(dx, i, c, nontemporal, dy, x, hi, invstd, dy_scale, xhat_scale, offset), _vector_op(2, _input_gradient)


# Rows a ``*_rows`` intrinsic computes per load of the per-feature rows.
ROWS = 4


@intrinsic
def vector_normalize_rows(typingctx, y, i, stride, c, nontemporal, x, hi, scale, shift):
    """``vector_normalize`` on ``ROWS`` rows: at ``i``, ``i + stride``, ...; every ``y`` address 32-byte aligned.

    The per-feature rows are loaded once for the ``ROWS`` vectors (``_kernels._row_groups``).
    """
    return types.void(y, i, stride, c, nontemporal, x, hi, scale, shift), _vector_op(1, _normalized, ROWS)


@intrinsic
def vector_grad_input_rows(typingctx, dx, i, stride, c, nontemporal, dy, x, hi, invstd, dy_scale, xhat_scale, offset):
    """``vector_grad_input`` on ``ROWS`` rows, as ``vector_normalize_rows``."""
    signature = types.void(dx, i, stride, c, nontemporal, dy, x, hi, invstd, dy_scale, xhat_scale, offset)
    return signature, _vector_op(2, _input_gradient, ROWS)


def _scaled(b, dy, dy_scale):
    return b.fmul(dy, dy_scale, flags=_FLAGS)


@intrinsic
def vector_scale(typingctx, dx, i, c, nontemporal, dy, dy_scale):
    """``dx[i:i+lanes] = dy * dy_scale``, as ``_kernels._slab_scale``; ``dx[i]`` 32-byte aligned.

    Arguments as for ``vector_normalize``.
    """
    return types.void(dx, i, c, nontemporal, dy, dy_scale), _vector_op(1, _scaled)
