"""The per-expert loops (XLA:CPU forms of the batched expert computation) against autodiff of
the plain batched arithmetic: outputs and every gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.model.feedforward import gelu
from cpm2_jax.moe.expert_loop import looped_gated_gelu, looped_matmul


def reference_block(rows, scale, wi_0, wi_1, wo):
    """y_e = (gelu((x_e s_e) W0_e) * ((x_e s_e) W1_e)) Wo_e with batched einsums."""
    xs = rows * scale[:, None, :]
    h = gelu(jnp.einsum("emd,edf->emf", xs, wi_0)) * jnp.einsum("emd,edf->emf", xs, wi_1)
    return jnp.einsum("emf,efd->emd", h, wo)


def operands(dtype=jnp.float32, e=3, m=5, d=8, f=12):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    rows = jax.random.normal(ks[0], (e, m, d))
    scale = 1.0 + 0.3 * jax.random.normal(ks[1], (e, d))
    wi_0, wi_1 = (0.4 * jax.random.normal(k, (e, d, f)) for k in ks[2:4])
    wo = 0.4 * jax.random.normal(ks[4], (e, f, d))
    probe = jax.random.normal(ks[5], (e, m, d))
    return rows, scale, wi_0.astype(dtype), wi_1.astype(dtype), wo.astype(dtype), probe


def test_looped_gated_gelu_matches_the_batched_block():
    *args, probe = operands()

    def loss(fn):
        return lambda *a: jnp.sum(jnp.tanh(fn(*a)) * probe)

    want_y = reference_block(*args)
    got_y = jax.jit(looped_gated_gelu)(*args)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(want_y).max()) > 0.1
    want = jax.grad(loss(reference_block), argnums=tuple(range(5)))(*args)
    got = jax.jit(jax.grad(loss(looped_gated_gelu), argnums=tuple(range(5))))(*args)
    for name, g, w in zip(("rows", "scale", "wi_0", "wi_1", "wo"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)


def test_looped_gated_gelu_in_bfloat16():
    """bf16 weights: products in bf16, the scaling in float32; gradients keep their dtypes."""
    *args, probe = operands(jnp.bfloat16)
    want = reference_block(args[0], args[1], *(a.astype(jnp.float32) for a in args[2:]))
    got = jax.jit(looped_gated_gelu)(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0.05, atol=0.05)
    grads = jax.grad(lambda *a: jnp.sum(looped_gated_gelu(*a).astype(jnp.float32) * probe),
                     argnums=tuple(range(5)))(*args)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16]


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (1, 7, 2, 9)])
def test_looped_matmul_matches_the_batched_dot(shape):
    e, m, k, n = shape
    rng = np.random.RandomState(1)
    lhs, rhs = jnp.asarray(rng.randn(e, m, k), jnp.float32), jnp.asarray(rng.randn(e, k, n), jnp.float32)
    probe = jnp.asarray(rng.randn(e, m, n), jnp.float32)
    batched = lambda a, b: jnp.einsum("emk,ekn->emn", a, b)  # noqa: E731
    np.testing.assert_allclose(np.asarray(looped_matmul(lhs, rhs)), np.asarray(batched(lhs, rhs)), rtol=1e-5,
                               atol=1e-5)
    want = jax.grad(lambda a, b: jnp.sum(jnp.sin(batched(a, b)) * probe), argnums=(0, 1))(lhs, rhs)
    got = jax.grad(lambda a, b: jnp.sum(jnp.sin(looped_matmul(a, b)) * probe), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
