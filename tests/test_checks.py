"""The shared argument checks: one wording, bools refused, numpy integers accepted."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from pixeldit_eqx import _checks


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = _checks.check_int("n", value, 1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {}, r"`n` must be an integer >= 0, got n=True\."),
        (np.bool_(True), {}, r"`n` must be an integer >= 0, got n="),
        (2.0, {}, r"`n` must be an integer >= 0, got n=2\.0\."),
        ("2", {}, r"`n` must be an integer >= 0, got n='2'\."),
        (0, {"minimum": 1}, r"`n` must be an integer >= 1, got n=0\."),
        (9, {"minimum": 1, "maximum": 8}, r"`n` must be an integer in \[1, 8\], got n=9\."),
        (None, {}, r"`n` must be an integer >= 0, got n=None\."),
        (-1, {"none_ok": True}, r"`n` must be an integer >= 0 or None, got n=-1\."),
    ],
)
def test_check_int_names_the_argument_the_bound_and_the_value(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _checks.check_int("n", value, **kwargs)


def test_check_int_passes_none_through_when_allowed():
    assert _checks.check_int("n", None, none_ok=True) is None


def test_check_choice():
    assert _checks.check_choice("method", "heun", ("heun", "euler")) == "heun"
    with pytest.raises(ValueError, match=r"`method` must be one of \('heun', 'euler'\), got method='rk4'\."):
        _checks.check_choice("method", "rk4", ("heun", "euler"))
    with pytest.raises(ValueError, match="`method` must be one of"):
        _checks.check_choice("method", ["heun"], ("heun", "euler"))


def test_check_key_wraps_raw_keys_and_refuses_other_arrays():
    typed = jr.key(0)
    assert _checks.check_key("key", typed) is typed
    wrapped = _checks.check_key("key", jr.PRNGKey(0))
    assert _checks.is_key(wrapped) and wrapped.shape == ()
    with pytest.raises(ValueError, match="`key` must be a JAX PRNG key, got int"):
        _checks.check_key("key", 0)
    with pytest.raises(ValueError, match=r"`key` must be a single PRNG key, got shape \(2,\)"):
        _checks.check_key("key", jr.split(typed))
    with pytest.raises(ValueError, match="`key` must be a PRNG key"):
        _checks.check_key("key", jnp.zeros(3))


def test_array_like_and_key_predicates():
    assert _checks.is_array_like(jnp.zeros(2)) and _checks.is_array_like(np.zeros(2))
    assert _checks.is_array_like(jax.ShapeDtypeStruct((2,), jnp.float32))
    assert not _checks.is_array_like(2.0)
    assert _checks.is_key(jr.key(0)) and not _checks.is_key(jr.PRNGKey(0)) and not _checks.is_key(3)
