"""The fused gated-GELU expert block (kernels.ffn: gated gmm + gmm, hand-written backward)
against the unfused block built from lax.ragged_dot under XLA autodiff: output and the
gradients w.r.t. x, W0, W1 and Wo, float32 within 1e-5 of the largest reference value, in
interpret mode for both lowerings (all groups, and one shard's groups via group_offset); and
both lowerings emit their device kernels for model-sized blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.kernels import Blocks, kernel_config
from cpm2_jax.kernels.ffn import gated_ffn
from cpm2_jax.model.feedforward import gelu

M, D, F, E = 24, 16, 40, 4
SIZES = [5, 0, 11, 3]  # an empty group, boundaries inside tiles, 5 rows past the groups
BLOCKS = {"tpu": Blocks(8, 128, 128), "gpu": Blocks(16, 16, 16, group_m=2)}  # F = 40: no block divides it


def _unfused(x, w0, w1, wo, sizes):
    """model.feedforward.gated_gelu's arithmetic with ragged_dot: (gelu(x W0) * (x W1)) Wo."""
    h = gelu(jax.lax.ragged_dot(x, w0, sizes)) * jax.lax.ragged_dot(x, w1, sizes)
    return jax.lax.ragged_dot(h, wo, sizes)


@pytest.mark.parametrize("lowering", ["tpu", "gpu"])
def test_fused_ffn_equals_the_unfused_block_with_gradients(lowering):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(M, D), jnp.float32)
    w0, w1 = (jnp.asarray(rng.randn(E, D, F) / 4, jnp.float32) for _ in range(2))
    wo = jnp.asarray(rng.randn(E, F, D) / 6, jnp.float32)
    probe = jnp.asarray(rng.randn(M, D), jnp.float32)
    sizes = jnp.asarray(SIZES, jnp.int32)
    config = kernel_config(lowering, BLOCKS[lowering], interpret=True)

    def value_and_grads(fn, x, w0, w1, wo):
        return jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 2, 3))(x, w0, w1, wo)

    @jax.jit
    def run(x, w0, w1, wo):
        fused = value_and_grads(lambda *a: gated_ffn(*a, sizes, config=config), x, w0, w1, wo)
        # One shard's experts 1..2: rows of groups 0 and 3 come out as zeros.
        shard = value_and_grads(lambda x, a, b, c: gated_ffn(x, a[1:3], b[1:3], c[1:3], sizes, group_offset=1,
                                                             config=config), x, w0, w1, wo)
        out = gated_ffn(x, w0, w1, wo, sizes, config=config)
        keep = ((jnp.arange(M) >= SIZES[0]) & (jnp.arange(M) < sum(SIZES[:3])))[:, None]
        want_shard = value_and_grads(lambda *a: jnp.where(keep, _unfused(*a, sizes), 0), x, w0, w1, wo)
        want = value_and_grads(lambda *a: _unfused(*a, sizes), x, w0, w1, wo)
        return fused, shard, out, want, want_shard

    fused, shard, out, want, want_shard = run(x, w0, w1, wo)
    assert float(jnp.abs(out).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(out)[sum(SIZES):], 0)  # rows past the groups
    names = ("loss", "d x", "d W0", "d W1", "d Wo")
    for what, got, ref in (("all groups", fused, want), ("groups 1..2", shard, want_shard)):
        for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(ref)):
            scale = float(np.abs(np.asarray(b)).max())
            assert scale > 1e-3, (what, name)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{lowering} {what} {name}")


@pytest.mark.parametrize("lowering,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                      ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_fused_ffn_emits_device_kernels(lowering, platform, marker):
    """bf16, default blocks: forward and backward lower to Mosaic / Triton kernels without the device."""
    config = kernel_config(lowering, interpret=False, platform=platform)
    s = jax.ShapeDtypeStruct
    x, w, wo = s((1024, 512), jnp.bfloat16), s((4, 512, 1024), jnp.bfloat16), s((4, 1024, 512), jnp.bfloat16)

    def train_like(x, w0, w1, wo, sizes):
        out, vjp = jax.vjp(lambda *a: gated_ffn(*a, sizes, config=config), x, w0, w1, wo)
        return out, vjp(out)

    text = jax.jit(train_like).trace(x, w, w, wo, s((4,), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()
    # Forward: gated gmm, gmm. Backward: a, b, dh, dx (2 gmms), dW0, dW1, dWo (3 tgmms).
    assert text.count(marker) == 10
    if lowering == "tpu":
        assert text.count("cpm2_gated_gmm") >= 1


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"gated_ffn needs x \[m, d\], w0 and w1 \[G, d, f\], wo \[G, f, d\]"):
        gated_ffn(jnp.zeros((4, 3)), jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)),
                  jnp.array([2, 2]))
