"""`lowp_dot`: a bf16 (or f16) matmul with a float32 result whose backward matmuls are
bf16 too, for `modules.dense`.

XLA:CPU runs a bf16 x bf16 -> float32 dot on the CPU's bf16 dot instructions, but
autodiff's transposes of `dot_general(..., preferred_element_type=float32)` multiply
the float32 cotangent with a bf16 operand, which XLA upcasts and runs at the float32
rate (`tests/benchmarks/bf16_dots.py`). This primitive is `dot_general` with a float32
result whose transposes round the cotangent to the operands' dtype first. That rounding
is exact where `dense` uses it (the cotangent of a result that is rounded to bf16 after
the bias); it is private to `dense` for that reason. Its batching rule folds a batch
axis of one operand into that operand's free axes, so that under `jax.vmap` the matmuls
(and, after autodiff, the weight gradients) stay single matmuls over all examples.
"""

from collections.abc import Sequence

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


Dims = tuple[tuple[int, ...], tuple[int, ...]]

lowp_dot_p = Primitive("pixeldit_lowp_dot")


def lowp_dot(a: jax.Array, b: jax.Array, dims: Dims) -> jax.Array:
    """`dot_general(a, b, (dims, ((), ())), preferred_element_type=float32)` for operands
    of one low-precision dtype; see the module docstring for its backward pass."""
    return lowp_dot_p.bind(a, b, contract=(tuple(dims[0]), tuple(dims[1])))


def _dot(a, b, *, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _abstract_eval(a, b, *, contract):
    out = jax.eval_shape(
        lambda a, b: _dot(a, b, contract=contract), *(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in (a, b))
    )
    return jax.core.ShapedArray(out.shape, out.dtype)


def _kept(ndim: int, contract: Sequence[int]) -> list[int]:
    return [i for i in range(ndim) if i not in contract]


def _transpose_lhs(g, x, y, *, contract):
    """Cotangent of `x` in `lowp_dot(x, y)` (cf. `lax._dot_general_transpose_lhs`)."""
    x_contract, y_contract = contract
    x_ndim = x.aval.ndim
    x_kept, y_kept = _kept(x_ndim, x_contract), _kept(np.ndim(y), y_contract)
    ans_y = tuple(range(len(x_kept), len(x_kept) + len(y_kept)))
    out = lowp_dot(g.astype(y.dtype), y, (ans_y, tuple(y_kept)))
    x_contract_sorted_by_y = list(np.take(x_contract, np.argsort(y_contract)))
    out_axes = tuple(int(i) for i in np.argsort(x_kept + x_contract_sorted_by_y))
    return jnp.transpose(out, out_axes).astype(x.aval.dtype)


def _transpose_rhs(g, x, y, *, contract):
    """Cotangent of `y` in `lowp_dot(x, y)`."""
    x_contract, y_contract = contract
    y_ndim = y.aval.ndim
    x_kept, y_kept = _kept(np.ndim(x), x_contract), _kept(y_ndim, y_contract)
    # g's axes are x_kept then y_kept: contract its x_kept axes with x's.
    out = lowp_dot(g.astype(x.dtype), x, (tuple(range(len(x_kept))), tuple(x_kept)))
    y_contract_sorted_by_x = list(np.take(y_contract, np.argsort(x_contract)))
    out_axes = tuple(int(i) for i in np.argsort(y_kept + y_contract_sorted_by_x))
    return jnp.transpose(out, out_axes).astype(y.aval.dtype)


def _move_to_front(x, axis: int, contract: Sequence[int]) -> tuple[jax.Array, tuple[int, ...]]:
    """`x` with its batch `axis` moved to 0, and the contracting axes (numbered without
    the batch axis) renumbered to match."""
    return jnp.moveaxis(x, axis, 0), tuple(c + 1 for c in contract)


def _batch(args, batch_dims, *, contract):
    (a, b), (da, db) = args, batch_dims
    a_contract, b_contract = contract
    if da is not None and db is None:
        a, a_contract = _move_to_front(a, da, a_contract)
        return lowp_dot(a, b, (a_contract, b_contract)), 0
    if da is None and db is not None:
        b, b_contract = _move_to_front(b, db, b_contract)
        return lowp_dot(a, b, (a_contract, b_contract)), a.ndim - len(a_contract)
    # Both batched (per-example weights, or per-example gradients): a batched dot.
    out = jax.vmap(lambda a, b: _dot(a, b, contract=contract), in_axes=(da, db))(a, b)
    return out, 0


lowp_dot_p.def_impl(lambda a, b, *, contract: _dot(a, b, contract=contract))
lowp_dot_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(lowp_dot_p, mlir.lower_fun(_dot, multiple_results=False))
ad.defbilinear(lowp_dot_p, _transpose_lhs, _transpose_rhs)
batching.primitive_batchers[lowp_dot_p] = _batch
