"""RMSNorm against hand-computed values (T5 LayerNorm: no mean subtraction, no bias)."""
import jax.numpy as jnp
import numpy as np

from cpm2_jax.model.norm import RMSNorm, rms_norm


def test_rms_norm_hand_computed():
    x = jnp.array([[3.0, 4.0]])
    # mean(x^2) = 12.5; y = x / sqrt(12.5 + eps) * scale
    y = rms_norm(x, jnp.array([1.0, 2.0]), epsilon=0.0)
    np.testing.assert_allclose(np.asarray(y), [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_no_mean_subtraction_and_eps():
    x = jnp.full((1, 4), 5.0)
    y = rms_norm(x, jnp.ones(4), epsilon=1e-6)
    np.testing.assert_allclose(np.asarray(y), 5.0 / np.sqrt(25.0 + 1e-6), rtol=1e-6)


def test_statistics_in_float32_for_bfloat16_inputs():
    x = jnp.array([[1e3, 2e3, 3e3, 4e3]], jnp.bfloat16)
    y = rms_norm(x, jnp.ones(4, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32) / np.sqrt(np.mean(np.asarray(x, np.float32) ** 2))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2)


def test_module_has_only_a_scale():
    import jax

    import flax.linen as nn

    v = nn.unbox(RMSNorm().init(jax.random.PRNGKey(0), jnp.ones((2, 8))))
    leaves = jax.tree_util.tree_leaves_with_path(v["params"])
    assert [jax.tree_util.keystr(p) for p, _ in leaves] == ["['scale']"]
