"""Explicit vector operations for the element-wise passes over ``(N, C)`` rows and short runs.

Each ``vector_*`` intrinsic computes one vector of the output (32 bytes; the flat
ones 64 on small arrays, as their ``width`` says; a ``*_rows`` one, one vector in
each of ``ROWS`` rows) from vectors of the inputs and of the per-feature rows,
then stores it, at an address aligned on the vector's width (the kernels peel
scalar values until it is). Each ``run_*`` intrinsic computes
a whole run of ``(N, C, H, W)`` data with one feature's constants (``_run_op``).
Numba cannot express either part of the ``vector_*`` ones:

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
from numba.np.arrayobj import populate_array

from ._config import FASTMATH

VECTOR_BYTES = 32  # one AVX register; on narrower targets LLVM splits the store
# The flat ``vector_*`` intrinsics (not the ``*_rows`` ones) also come in this width, for
# small arrays (``_kernels.WIDE_VECTORS_MAX_BYTES``): one AVX-512 register.
WIDE_VECTOR_BYTES = 64
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
def shaped_view(typingctx, flat, offset, shape):
    """``flat[offset : offset + prod(shape)].reshape(shape)``: a C-contiguous view of the 1-D ``flat``.

    Numba's ``reshape`` checks the layout in a helper call, which cost each
    kernel call about 50 ns, a twentieth of a small batch's time.
    """
    view_type = types.Array(flat.dtype, len(shape), "C")

    def codegen(context, builder, signature, args):
        flat_value, offset, shape_value = args
        source = context.make_array(signature.args[0])(context, builder, flat_value)
        view = context.make_array(view_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(flat.dtype)))
        extents = cgutils.unpack_tuple(builder, shape_value)
        strides = [itemsize]
        for extent in extents[:0:-1]:
            strides.insert(0, builder.mul(strides[0], extent))
        populate_array(
            view,
            data=builder.gep(source.data, [offset]),
            shape=extents,
            strides=strides,
            itemsize=itemsize,
            meminfo=source.meminfo,
            parent=None,
        )
        result = view._getvalue()
        context.nrt.incref(builder, view_type, result)  # the view holds the memory too
        return result

    return view_type(flat, types.intp, types.UniTuple(types.intp, len(shape))), codegen


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


def _vector_op(inputs, expression, rows=1, width=VECTOR_BYTES, width_argument=False):
    """The codegen of ``out[i : i + lanes] = expression(inputs..., per-feature rows...)``, in vectors of ``width`` bytes.

    Arguments: ``out, i, c, nontemporal``; then ``inputs`` flat arrays read at
    ``i``; then the per-feature rows, read at feature ``c``. All loads come
    before the store, so ``out`` may be one of the inputs. ``nontemporal``
    picks the store at run time (a branch per vector, which always goes the
    same way), so one compiled loop serves both stores.

    With ``rows > 1``, a ``stride`` follows ``i``: the vectors at ``i``,
    ``i + stride``, ... (``rows`` of them, the same features of consecutive
    rows) share one load of the per-feature rows, and are all loaded before
    any is stored. ``width_argument``: the last argument is the width's
    literal (``_width``), not an operand.
    """
    fixed = 4 if rows == 1 else 5

    def codegen(context, builder, signature, args):
        out_type = signature.args[0]
        vector_type = ir.VectorType(context.get_value_type(out_type.dtype), width * 8 // out_type.dtype.bitwidth)
        out, i, *rest = args[:fixed]
        stride, c, nontemporal = rest if rows > 1 else [None, *rest]
        starts = [i] + [builder.add(i, builder.mul(stride, ir.Constant(ir.IntType(64), r))) for r in range(1, rows)]
        kinds, values = signature.args[fixed:], args[fixed:]
        if width_argument:
            kinds, values = kinds[:-1], values[:-1]
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
                    store = builder.store(result, pointer, align=width)
                    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            with plain:
                for pointer, result in zip(pointers, results):
                    builder.store(result, pointer, align=width)
        return context.get_dummy_value()

    return codegen


def _normalized(b, x, hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, hi, flags=_FLAGS), scale, flags=_FLAGS), shift, flags=_FLAGS)


def _input_gradient(b, dy, x, hi, invstd, dy_hi, dy_scale, xhat_scale, offset):
    xhat = b.fmul(b.fsub(x, hi, flags=_FLAGS), invstd, flags=_FLAGS)
    centred = b.fsub(dy, dy_hi, flags=_FLAGS)
    scaled = b.fsub(b.fmul(centred, dy_scale, flags=_FLAGS), b.fmul(xhat, xhat_scale, flags=_FLAGS), flags=_FLAGS)
    return b.fsub(scaled, offset, flags=_FLAGS)


def _folded_run_gradient(b, dy, x, hi, dy_hi, dy_scale, xmu_scale, offset):
    centred = b.fsub(dy, dy_hi, flags=_FLAGS)
    scaled = b.fsub(b.fmul(centred, dy_scale, flags=_FLAGS), b.fmul(b.fsub(x, hi, flags=_FLAGS), xmu_scale, flags=_FLAGS), flags=_FLAGS)
    return b.fsub(scaled, offset, flags=_FLAGS)


def _folded_input_gradient(b, dy, x, hi, dy_scale, xmu_scale, offset):
    scaled = b.fsub(b.fmul(dy, dy_scale, flags=_FLAGS), b.fmul(b.fsub(x, hi, flags=_FLAGS), xmu_scale, flags=_FLAGS), flags=_FLAGS)
    return b.fsub(scaled, offset, flags=_FLAGS)


def _width(width):
    """The vector width in bytes that a ``vector_*`` intrinsic's last argument gives: a literal,
    ``VECTOR_BYTES`` or ``WIDE_VECTOR_BYTES`` (None, a typing error, for anything else)."""
    if isinstance(width, types.IntegerLiteral) and width.literal_value in (VECTOR_BYTES, WIDE_VECTOR_BYTES):
        return width.literal_value
    return None


@intrinsic
def vector_normalize(typingctx, y, i, c, nontemporal, x, hi, scale, shift, width):
    """``y[i:i+lanes] = (x - hi) * scale + shift``, as ``_kernels._slab_normalize``; ``y[i]`` aligned on ``width``.

    ``y`` and ``x`` are flat and read at ``i``; the per-feature rows are read
    at feature ``c`` (consecutive values of ``(N, C)`` rows are consecutive
    features, and the rows are padded past the last feature: ``_kernels.PARAMS_PAD``).
    ``nontemporal``: store with a non-temporal store. ``width``: the vector's
    bytes, a literal (``_width``).
    """
    width_bytes = _width(width)
    if width_bytes is None:
        return None
    return types.void(y, i, c, nontemporal, x, hi, scale, shift, width), _vector_op(1, _normalized, width=width_bytes, width_argument=True)


@intrinsic
def vector_grad_input(typingctx, dx, i, c, nontemporal, dy, x, hi, dy_scale, xmu_scale, offset, width):
    """``dx[i:i+lanes] = dy * dy_scale - (x - hi) * xmu_scale - offset``; ``dx[i]`` aligned on ``width``.

    As ``_kernels._grad_input_vectors``, operation for operation: four
    per-feature rows, ``xmu_scale`` being ``invstd * xhat_scale`` rounded once
    (``_kernels._grad_column``). Arguments as for ``vector_normalize``.
    """
    width_bytes = _width(width)
    if width_bytes is None:
        return None
    signature = types.void(dx, i, c, nontemporal, dy, x, hi, dy_scale, xmu_scale, offset, width)
    return signature, _vector_op(2, _folded_input_gradient, width=width_bytes, width_argument=True)


@intrinsic
def value_grad_input(typingctx, dy, x, hi, dy_scale, xmu_scale, offset):
    """One value of ``vector_grad_input``: the same operations on scalars, for the values the vectors leave.

    Written in Numba, the line that computes it is compiled with ``reassoc`` as
    well, and LLVM may group its subtractions another way: values of a ``dx``
    that cancels to near zero then depended on where the output's vectors began.
    """

    if not isinstance(x, types.Float) or any(kind != x for kind in (dy, hi, dy_scale, xmu_scale, offset)):
        return None  # a TypingError: the operations take one float type

    def codegen(context, builder, signature, args):
        return _folded_input_gradient(builder, *args)

    return x(dy, x, hi, dy_scale, xmu_scale, offset), codegen


# Rows a ``*_rows`` intrinsic computes per load of the per-feature rows.
ROWS = 4


@intrinsic
def vector_normalize_rows(typingctx, y, i, stride, c, nontemporal, x, hi, scale, shift):
    """``vector_normalize`` on ``ROWS`` rows: at ``i``, ``i + stride``, ...; every ``y`` address 32-byte aligned.

    The per-feature rows are loaded once for the ``ROWS`` vectors (``_kernels._row_groups``).
    """
    return types.void(y, i, stride, c, nontemporal, x, hi, scale, shift), _vector_op(1, _normalized, ROWS)


@intrinsic
def vector_grad_input_rows(typingctx, dx, i, stride, c, nontemporal, dy, x, hi, dy_scale, xmu_scale, offset):
    """``vector_grad_input`` on ``ROWS`` rows, as ``vector_normalize_rows``."""
    signature = types.void(dx, i, stride, c, nontemporal, dy, x, hi, dy_scale, xmu_scale, offset)
    return signature, _vector_op(2, _folded_input_gradient, ROWS)


def _scaled(b, dy, dy_scale):
    return b.fmul(dy, dy_scale, flags=_FLAGS)


@intrinsic
def vector_scale(typingctx, dx, i, c, nontemporal, dy, dy_scale, width):
    """``dx[i:i+lanes] = dy * dy_scale``, as ``_kernels._slab_scale``; ``dx[i]`` aligned on ``width``.

    Arguments as for ``vector_normalize``.
    """
    width_bytes = _width(width)
    if width_bytes is None:
        return None
    return types.void(dx, i, c, nontemporal, dy, dy_scale, width), _vector_op(1, _scaled, width=width_bytes, width_argument=True)


def _splat(builder, value, vector_type):
    """``value`` in every lane of a ``vector_type``."""
    lane = ir.Constant(ir.IntType(32), 0)
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, lane)
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined), mask)


def _run_op(inputs, expression):
    """The codegen of ``out[start:stop] = expression(inputs..., constants...)`` over one run.

    Arguments: ``out, start, stop``; then ``inputs`` flat arrays read at the
    same indices; then one scalar per constant, the same for the whole run
    (one feature's). Whole vectors from ``start`` on, unaligned, each loaded
    before it is stored (so ``out`` may be an input), then the values after the
    last whole vector one at a time: the same operations on each value, in
    vectors or not.
    """

    def codegen(context, builder, signature, args):
        out_type = signature.args[0]
        value_type = context.get_value_type(out_type.dtype)
        lanes = VECTOR_BYTES * 8 // out_type.dtype.bitwidth
        vector_type = ir.VectorType(value_type, lanes)
        index_type = ir.IntType(64)
        align = out_type.dtype.bitwidth // 8
        out, start, stop = args[:3]
        arrays = [out] + list(args[3 : 3 + inputs])
        data = [context.make_array(kind)(context, builder, value).data for kind, value in zip(signature.args[:1] + signature.args[3 : 3 + inputs], arrays)]
        constants = args[3 + inputs :]
        broadcast = [_splat(builder, constant, vector_type) for constant in constants]
        count = builder.sub(stop, start)
        vectors_stop = builder.add(start, builder.mul(builder.sdiv(count, ir.Constant(index_type, lanes)), ir.Constant(index_type, lanes)))
        with cgutils.for_range_slice(builder, start, vectors_stop, ir.Constant(index_type, lanes)) as (i, _):
            pointers = [builder.bitcast(builder.gep(d, [i]), vector_type.as_pointer()) for d in data]
            values = [builder.load(pointer, align=align) for pointer in pointers[1:]]
            builder.store(expression(builder, *values, *broadcast), pointers[0], align=align)
        with cgutils.for_range_slice(builder, vectors_stop, stop, ir.Constant(index_type, 1)) as (i, _):
            values = [builder.load(builder.gep(d, [i])) for d in data[1:]]
            builder.store(expression(builder, *values, *constants), builder.gep(data[0], [i]))
        return context.get_dummy_value()

    return codegen


@intrinsic
def run_normalize(typingctx, y, start, stop, x, hi, scale, shift):
    """``y[start:stop] = (x[start:stop] - hi) * scale + shift``: one run of ``(N, C, H, W)`` data, flat.

    As ``vector_normalize``, with one feature's constants for the whole run
    and no alignment asked of ``y``. The loop LLVM makes of the same line
    checks at run time whether ``y`` and ``x`` overlap, and ends in a scalar
    remainder: on runs of 7x7 values that set-up costs a sixth of the pass.
    """
    return types.void(y, start, stop, x, hi, scale, shift), _run_op(1, _normalized)


@intrinsic
def run_grad_input(typingctx, dx, start, stop, dy, x, hi, invstd, dy_hi, dy_scale, xhat_scale, offset):
    """``dx[start:stop] = (dy - dy_hi) * dy_scale - ((x - hi) * invstd) * xhat_scale - offset`` over one run, as ``run_normalize``."""
    signature = types.void(dx, start, stop, dy, x, hi, invstd, dy_hi, dy_scale, xhat_scale, offset)
    return signature, _run_op(2, _input_gradient)


@intrinsic
def run_grad_input_folded(typingctx, dx, start, stop, dy, x, hi, dy_hi, dy_scale, xmu_scale, offset):
    """``dx[start:stop] = (dy - dy_hi) * dy_scale - (x - hi) * xmu_scale - offset`` over one run, as ``run_normalize``:
    ``run_grad_input`` with ``invstd * xhat_scale`` as one factor, where it is in the dtype's range."""
    signature = types.void(dx, start, stop, dy, x, hi, dy_hi, dy_scale, xmu_scale, offset)
    return signature, _run_op(2, _folded_run_gradient)


@intrinsic
def run_scale(typingctx, dx, start, stop, dy, dy_scale):
    """``dx[start:stop] = dy * dy_scale`` over one run, as ``run_normalize``."""
    return types.void(dx, start, stop, dy, dy_scale), _run_op(1, _scaled)
