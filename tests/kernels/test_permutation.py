"""The token permutation kernels (sort-by-expert gather, weighted combine) and their gradients
against jnp.take and a weighted sum under XLA autodiff, in interpret mode for both lowerings;
and both lower to device kernels (Mosaic / Triton IR) without the device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.kernels import kernel_config
from cpm2_jax.kernels.permutation import combine, inverse_maps, permute

T, K, D, E = 12, 2, 40, 4


def _routing(rng):
    """Top-2 style assignments sorted by expert, ~20% dropped (their rows read zeros), and 3
    trailing rows past every assignment: token_of_row [M], rows_of_token [T, K]."""
    expert = np.where(rng.rand(T, K) < 0.2, E, rng.randint(0, E, (T, K))).reshape(-1)
    order = np.argsort(expert, kind="stable")
    token = np.where(expert[order] == E, T, order // K)
    token = np.concatenate([token, np.full(3, T)])
    choice = np.concatenate([order % K, np.zeros(3, int)])
    token, choice = jnp.asarray(token, jnp.int32), jnp.asarray(choice, jnp.int32)
    return token, inverse_maps(token, T, K, choice)


@pytest.mark.parametrize("lowering", ["tpu", "gpu"])
def test_permute_and_combine_with_gradients_equal_xla(lowering):
    rng = np.random.RandomState(0)
    token, rows_of_token = _routing(rng)
    rows = np.asarray(rows_of_token)
    assert (rows < token.shape[0]).sum() == (np.asarray(token) < T).sum()  # inverse of each other
    x, w = jnp.asarray(rng.randn(T, D), jnp.float32), jnp.asarray(rng.rand(T, K), jnp.float32)
    mix, probe = jnp.asarray(rng.randn(D, D), jnp.float32), jnp.asarray(rng.randn(T, D), jnp.float32)
    config = kernel_config(lowering, interpret=True)

    def loss(x, w, use_kernels):
        r = permute(x, token, rows_of_token, use_kernels=use_kernels, config=config)
        y = jnp.tanh(r @ mix)  # stands in for the experts
        out = combine(y, w, rows_of_token, token, use_kernels=use_kernels, config=config)
        return jnp.sum(out * probe), (r, out)

    grad = lambda use: jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(x, w, use)
    got, want = grad(True), grad(False)
    (_, (r, _)), _ = got
    assert not np.asarray(r)[np.asarray(token) >= T].any()  # dropped and trailing rows are zero
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=lowering)


@pytest.mark.parametrize("lowering,platform,marker", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
def test_permutation_lowers_to_device_kernels(lowering, platform, marker):
    config = kernel_config(lowering, interpret=False, platform=platform)
    tokens, d = 256, 1024

    def fwd_bwd(x, w, token, rows):
        r, permute_vjp = jax.vjp(lambda x: permute(x, token, rows, config=config), x)
        out, combine_vjp = jax.vjp(lambda y, w: combine(y, w, rows, token, config=config), r, w)
        return out, permute_vjp(r), combine_vjp(out)

    s = jax.ShapeDtypeStruct
    text = jax.jit(fwd_bwd).trace(s((tokens, d), jnp.bfloat16), s((tokens, K), jnp.float32),
                                  s((tokens * K,), jnp.int32), s((tokens, K), jnp.int32)).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 5  # permute, combine; backward: combine, 2 permutes
