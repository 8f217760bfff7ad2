"""Argument checks shared by the package: one wording for every message.

A check raises `ValueError` naming the argument, what it expects and what it got, and
returns the value in the type the caller goes on with.
"""

from collections.abc import Collection
from typing import Any, Literal, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (`True` is an `int` to Python)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@overload
def check_int(
    name: str, value: Any, minimum: int = 0, *, maximum: int | None = None, none_ok: Literal[False] = False
) -> int: ...


@overload
def check_int(
    name: str, value: Any, minimum: int = 0, *, maximum: int | None = None, none_ok: Literal[True]
) -> int | None: ...


def check_int(
    name: str, value: Any, minimum: int = 0, *, maximum: int | None = None, none_ok: bool = False
) -> int | None:
    """`value` as an `int` in `[minimum, maximum]`, else a `ValueError` naming `name`.

    With `none_ok`, `None` passes through (and the message says it is allowed).
    """
    if value is None and none_ok:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        number = int(value)
        if number >= minimum and (maximum is None or number <= maximum):
            return number
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    allowed = " or None" if none_ok else ""
    raise ValueError(f"`{name}` must be an integer {bound}{allowed}, got {name}={value!r}.")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """`value` if it is one of `choices`, else a `ValueError` listing them."""
    if isinstance(value, str | int | float | bool | None) and value in choices:
        return value
    raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {name}={value!r}.")


def is_array_like(x: Any) -> bool:
    """An array or an abstract one (`jax.ShapeDtypeStruct`, as `eqx.filter_eval_shape` gives)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def is_key(x: Any) -> bool:
    """A typed PRNG key (`jax.random.key`), concrete or abstract."""
    return is_array_like(x) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def check_key(name: str, key: Any) -> PRNGKeyArray:
    """One typed PRNG key; a raw `uint32[2]` key (`jax.random.PRNGKey`) is wrapped."""
    if not isinstance(key, jax.Array):
        raise ValueError(f"`{name}` must be a JAX PRNG key, got {type(key).__name__}.")
    if is_key(key):
        if key.shape != ():
            raise ValueError(f"`{name}` must be a single PRNG key, got shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jr.wrap_key_data(key)
    raise ValueError(
        f"`{name}` must be a PRNG key (`jax.random.key`), got an array of dtype {key.dtype} and shape {key.shape}."
    )
