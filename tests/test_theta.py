"""`ParameterTokens` and `ParameterConditioned`: parameters θ as the t2i model's condition."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx
from pixeldit_eqx import flow

from .helpers import fast_jit, SMALL_T2I


LOW = np.array([0.5, 1.0], dtype=np.float32)
HIGH = np.array([1.5, 3.0], dtype=np.float32)


def _tiny_model(txt_embed_dim=12, txt_max_length=2):
    """A tiny t2i model, its zero-initialised leaves (the final layer) made random so that
    its velocity depends on its condition."""
    config = SMALL_T2I | dict(txt_embed_dim=txt_embed_dim, txt_max_length=txt_max_length)
    model = pixeldit_eqx.PixelDiTT2I(**config, key=jr.key(0))
    leaves, treedef = jax.tree.flatten(model)
    keys = iter(jr.split(jr.key(99), len(leaves)))
    leaves = [
        0.1 * jr.normal(next(keys), x.shape) if eqx.is_inexact_array(x) and not bool(jnp.any(x)) else x for x in leaves
    ]
    return jax.tree.unflatten(treedef, leaves)


def test_tokens_shapes_and_features():
    tokens = pixeldit_eqx.ParameterTokens(LOW, HIGH, 12, num_frequencies=3, key=jr.key(1))
    theta = jnp.array([1.0, 2.5], dtype=jnp.float32)
    out = tokens(theta)
    assert out.shape == (2, 12) and out.dtype == jnp.float32 and tokens.num_tokens == 2
    feats = tokens.features(theta)
    u = np.array([0.0, 0.5])
    angles = u[:, None] * np.arange(1, 4) * np.pi / 2
    np.testing.assert_allclose(feats, np.concatenate([u[:, None], np.sin(angles), np.cos(angles)], -1), atol=1e-6)
    # Each token is its parameter's identity plus a map of that parameter's features only.
    moved = tokens(jnp.array([1.3, 2.5], dtype=jnp.float32))
    assert not np.allclose(moved[0], out[0]) and np.array_equal(moved[1], out[1])

    pooled = pixeldit_eqx.ParameterTokens(LOW, HIGH, 12, pooled=True, key=jr.key(1))
    assert pooled(theta).shape == (1, 12) and pooled.num_tokens == 1


def test_null_theta_gives_null_tokens_with_finite_gradients():
    tokens = pixeldit_eqx.ParameterTokens(LOW, HIGH, 8, key=jr.key(2))
    null = tokens.null_theta()
    assert null.shape == (2,) and bool(jnp.all(jnp.isnan(null)))
    np.testing.assert_array_equal(tokens(null), tokens.null)
    half = jnp.array([jnp.nan, 2.0], dtype=jnp.float32)
    out = tokens(half)
    np.testing.assert_array_equal(out[0], tokens.null[0])
    np.testing.assert_array_equal(out[1], tokens(jnp.array([1.0, 2.0], dtype=jnp.float32))[1])
    grads = eqx.filter_grad(lambda m: jnp.sum(m(half) ** 2))(tokens)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array)))
    g_theta = jax.grad(lambda th: jnp.sum(tokens(th) ** 2))(half)
    assert g_theta[0] == 0 and jnp.isfinite(g_theta[1]) and g_theta[1] != 0
    # The bounds are buffers, not trained.
    params = eqx.filter(tokens, pixeldit_eqx.trainable(tokens))
    assert params.low.array is None and params.high.array is None


def test_conditioned_model_is_a_velocity_for_training_and_likelihood():
    model = pixeldit_eqx.ParameterConditioned(_tiny_model(), pixeldit_eqx.ParameterTokens(LOW, HIGH, 12, key=jr.key(3)))
    theta = jnp.array([1.2, 1.7], dtype=jnp.float32)
    x = jr.normal(jr.key(4), (1, 4, 4))
    v = model(x, 0.3, theta)
    assert v.shape == (1, 4, 4)
    np.testing.assert_array_equal(v, model.model(x, 0.3, model.tokens(theta)))
    # Training: gradients reach the token embeddings.
    loss = lambda m: flow.flow_matching_loss(  # noqa: E731
        m, x, theta, key=jr.key(5), null_cond=m.tokens.null_theta(), drop_prob=0.0
    )
    grads = fast_jit(eqx.filter_grad(loss))(model)
    assert float(jnp.abs(grads.tokens.projection).sum()) > 0
    # A likelihood differentiable in θ.
    g = fast_jit(
        jax.grad(
            lambda th: flow.log_likelihood(
                model, x, th, solver=diffrax.Euler(), num_steps=1, divergence="hutchinson", key=jr.key(6)
            )
        )
    )(theta)
    assert g.shape == (2,) and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low=LOW, high=LOW), "high"),
        (dict(low=np.array([0.5, np.inf], dtype=np.float32)), "finite"),
        (dict(txt_embed_dim=0), "txt_embed_dim"),
        (dict(num_frequencies=-1), "num_frequencies"),
    ],
)
def test_tokens_bad_arguments(kwargs, match):
    args = dict(low=LOW, high=HIGH, txt_embed_dim=8) | kwargs
    with pytest.raises(ValueError, match=match):
        pixeldit_eqx.ParameterTokens(**args, key=jr.key(0))


@pytest.mark.parametrize(
    "model_kwargs, match", [(dict(txt_embed_dim=8), "txt_embed_dim"), (dict(txt_max_length=1), "txt_max_length")]
)
def test_conditioned_bad_arguments(model_kwargs, match):
    tokens = pixeldit_eqx.ParameterTokens(LOW, HIGH, 12, key=jr.key(0))
    with pytest.raises(ValueError, match=match):
        pixeldit_eqx.ParameterConditioned(_tiny_model(**model_kwargs), tokens)


def test_tokens_refuse_a_theta_of_another_size():
    tokens = pixeldit_eqx.ParameterTokens(LOW, HIGH, 12, key=jr.key(0))
    with pytest.raises(ValueError, match="theta"):
        tokens(jnp.zeros(3, dtype=jnp.float32))
