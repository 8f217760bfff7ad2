"""The matmul primitives of `_ops.dense`: `dot_general` with batching and transpose
rules chosen for XLA:CPU.

- `lowp_dot`: a bf16 (or f16) matmul with a float32 result whose backward matmuls are
  bf16 too. XLA:CPU runs a bf16 x bf16 -> float32 dot on the CPU's bf16 dot
  instructions, but autodiff's transposes of `dot_general(...,
  preferred_element_type=float32)` multiply the float32 cotangent with a bf16 operand,
  which XLA upcasts and runs at the float32 rate (`tests/benchmarks/bf16_dots.py`).
  Its transposes round the cotangent to the operands' dtype first. That rounding is
  exact where `dense` uses it (the cotangent of a result that is rounded to bf16 after
  the bias); it is private to `dense` for that reason.
- `rows_dot`: a plain same-dtype matmul (float32, float64) whose batching rule merges
  the batch axis into the rows. Under `jax.vmap` a Linear's input is `(batch, tokens,
  d_in)`, and autodiff's weight gradient of a plain `dot_general` contracts both of
  those axes; XLA:CPU then transposes the (large) cotangent into a 2-D matrix before
  the matmul. With the rows merged the weight gradient contracts one axis, and XLA
  writes its (small) result transposed instead. The values are those of
  `dot_general`: the forward bitwise, the weight gradient summed in another order.

Under `jax.vmap` both stay single matmuls over all examples (the batching rules fold a
batch axis of one operand into its free axes). `lowp_dot` keeps the two axes apart:
there, XLA:CPU runs a bf16 weight gradient contracted on the operands' major axis on
its float32 path, slower than transposing the bf16 cotangent first.
"""

from collections.abc import Callable, Sequence
from math import prod

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.typing import DTypeLike


Dims = tuple[tuple[int, ...], tuple[int, ...]]
_Bind = Callable[[jax.Array, jax.Array, Dims], jax.Array]


def _kept(ndim: int, contract: Sequence[int]) -> list[int]:
    return [i for i in range(ndim) if i not in contract]


def _move_to_front(x, axis: int, contract: Sequence[int]) -> tuple[jax.Array, tuple[int, ...]]:
    """`x` with its batch `axis` moved to 0, and the contracting axes (numbered without
    the batch axis) renumbered to match."""
    return jnp.moveaxis(x, axis, 0), tuple(c + 1 for c in contract)


def _primitive(name: str, result_dtype: DTypeLike | None, merge_rows: bool) -> _Bind:
    """A `dot_general` primitive (`preferred_element_type=result_dtype`) whose
    transposes round the cotangent to the other operand's dtype and whose batching rule
    folds a one-sided batch axis into the free axes (and, with `merge_rows`, merges the
    free axes of the batched left operand into one)."""
    prim = Primitive(name)

    def bind(a: jax.Array, b: jax.Array, dims: Dims) -> jax.Array:
        return prim.bind(a, b, contract=(tuple(dims[0]), tuple(dims[1])))

    def dot(a, b, *, contract):
        return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=result_dtype)

    def abstract_eval(a, b, *, contract):
        avals = (jax.ShapeDtypeStruct(v.shape, v.dtype) for v in (a, b))
        out = jax.eval_shape(lambda a, b: dot(a, b, contract=contract), *avals)
        return jax.core.ShapedArray(out.shape, out.dtype)

    def transpose_lhs(g, x, y, *, contract):
        """Cotangent of `x` in `bind(x, y)` (cf. `lax._dot_general_transpose_lhs`)."""
        x_contract, y_contract = contract
        x_kept, y_kept = _kept(x.aval.ndim, x_contract), _kept(np.ndim(y), y_contract)
        ans_y = tuple(range(len(x_kept), len(x_kept) + len(y_kept)))
        out = bind(g.astype(y.dtype), y, (ans_y, tuple(y_kept)))
        x_contract_sorted_by_y = list(np.take(x_contract, np.argsort(y_contract)))
        out_axes = tuple(int(i) for i in np.argsort(x_kept + x_contract_sorted_by_y))
        return jnp.transpose(out, out_axes).astype(x.aval.dtype)

    def transpose_rhs(g, x, y, *, contract):
        """Cotangent of `y` in `bind(x, y)`."""
        x_contract, y_contract = contract
        x_kept, y_kept = _kept(np.ndim(x), x_contract), _kept(y.aval.ndim, y_contract)
        # g's axes are x_kept then y_kept: contract its x_kept axes with x's.
        out = bind(g.astype(x.dtype), x, (tuple(range(len(x_kept))), tuple(x_kept)))
        y_contract_sorted_by_x = list(np.take(y_contract, np.argsort(x_contract)))
        out_axes = tuple(int(i) for i in np.argsort(y_kept + y_contract_sorted_by_x))
        return jnp.transpose(out, out_axes).astype(y.aval.dtype)

    def batch(args, batch_dims, *, contract):
        (a, b), (da, db) = args, batch_dims
        a_contract, b_contract = contract
        if da is not None and db is None:
            a, a_contract = _move_to_front(a, da, a_contract)
            free = a.ndim - len(a_contract)
            if merge_rows and free >= 2 and a_contract == tuple(range(free, a.ndim)):
                rows = a.shape[:free]
                merged = a.reshape((prod(rows),) + a.shape[free:])
                out = bind(merged, b, (tuple(c - free + 1 for c in a_contract), b_contract))
                return out.reshape(rows + out.shape[1:]), 0
            return bind(a, b, (a_contract, b_contract)), 0
        if da is None and db is not None:
            b, b_contract = _move_to_front(b, db, b_contract)
            return bind(a, b, (a_contract, b_contract)), a.ndim - len(a_contract)
        # Both batched (per-example weights, or per-example gradients): a batched dot.
        out = jax.vmap(lambda a, b: dot(a, b, contract=contract), in_axes=(da, db))(a, b)
        return out, 0

    prim.def_impl(lambda a, b, *, contract: dot(a, b, contract=contract))
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(dot, multiple_results=False))
    ad.defbilinear(prim, transpose_lhs, transpose_rhs)
    batching.primitive_batchers[prim] = batch
    return bind


#: The primitives' names, as they appear in jaxprs.
NAMES = ("pixeldit_lowp_dot", "pixeldit_rows_dot")
_lowp_dot = _primitive(NAMES[0], jnp.float32, merge_rows=False)
_rows_dot = _primitive(NAMES[1], None, merge_rows=True)


def lowp_dot(a: jax.Array, b: jax.Array, dims: Dims) -> jax.Array:
    """`dot_general(a, b, (dims, ((), ())), preferred_element_type=float32)` for operands
    of one low-precision dtype; see the module docstring for its backward pass."""
    return _lowp_dot(a, b, dims)


def rows_dot(a: jax.Array, b: jax.Array, dims: Dims) -> jax.Array:
    """`dot_general(a, b, (dims, ((), ())))` for operands of one float32 (or float64)
    dtype; under `jax.vmap` it merges the batch axis into `a`'s rows (module docstring)."""
    return _rows_dot(a, b, dims)
