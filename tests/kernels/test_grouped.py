"""gmm / tgmm / their custom_vjp against lax.ragged_dot (outputs and both gradients), in Pallas
interpret mode on the CPU, for both lowerings (Mosaic TPU with scalar prefetch, Triton GPU);
and both lowerings emit their device kernels (Mosaic / Triton IR) for model-sized blocks.

Tolerances: float32 within 1e-5 of the largest reference value; bfloat16 (inputs rounded to
bf16, f32 accumulation, output rounded to bf16) within 1e-2 of it (2.6 bf16 ulps)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.kernels import Blocks, gmm, kernel_config

M, K, N, E = 40, 24, 20, 4
# Blocks smaller than the problem, none dividing K or N; Triton's must be powers of two.
BLOCKS = {"tpu": Blocks(8, 16, 16), "gpu": Blocks(16, 16, 16, group_m=2)}  # 3 swizzle groups of steps
SIZES = [
    [7, 0, 19, 7],  # an empty group, boundaries inside tiles, sum < m
    [0, 0, 40, 0],  # one group holds every row
    [0, 0, 0, 0],  # no rows at all
    [3, 5, 0, 2],  # m much larger than sum(group_sizes)
    [8, 16, 0, 16],  # tile-aligned boundaries, sum = m
    [1, 13, 11, 9],
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@functools.lru_cache(maxsize=None)
def _kernel_and_reference(lowering, dtype):
    """One jitted program per (lowering, dtype) (interpret mode compiles slowly): for given
    group sizes and a shard's group offset, the kernels' (out, d lhs, d rhs) for all groups and
    (float32 only, to halve the bf16 programs) for groups offset..offset+1, and ragged_dot's."""
    config = kernel_config(lowering, BLOCKS[lowering], interpret=True)

    def with_grads(fn, lhs, rhs, cot):
        out, vjp = jax.vjp(fn, lhs, rhs)
        return (out, *vjp(cot))

    @jax.jit
    def run(lhs, rhs, sizes, cot, offset, lhs_ref):
        full = with_grads(lambda a, b: gmm(a, b, sizes, config=config), lhs, rhs, cot)
        part = None
        if dtype == jnp.float32:
            part = with_grads(lambda a, b: gmm(a, b, sizes, group_offset=offset, config=config), lhs,
                              jax.lax.dynamic_slice_in_dim(rhs, offset, 2), cot)
        ref = with_grads(lambda a, b: jax.lax.ragged_dot(a, b, sizes), lhs_ref, rhs, cot)
        return full, part, ref

    return run


def _check(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=what)


@pytest.mark.parametrize("lowering", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_and_gradients_equal_ragged_dot(lowering, dtype):
    rng = np.random.RandomState(0)
    run = _kernel_and_reference(lowering, dtype)
    rhs = jnp.asarray(rng.randn(E, K, N), dtype)
    cot = jnp.asarray(rng.randn(M, N), dtype)
    for i, sizes in enumerate(SIZES):  # d rhs is tgmm's output
        total, offset = sum(sizes), i % 3
        x = rng.randn(M, K)
        lhs_ref = jnp.asarray(np.where(np.arange(M)[:, None] < total, x, 0.0), dtype)
        # Rows past sum(group_sizes) hold NaN: the kernels must still write zeros there.
        lhs = jnp.asarray(np.where(np.arange(M)[:, None] < total, x, np.nan), dtype)
        sizes = jnp.asarray(sizes, jnp.int32)
        (out, d_lhs, d_rhs), part, (r_out, r_lhs, r_rhs) = run(lhs, rhs, sizes, cot, offset, lhs_ref)
        what = f"{lowering} {jnp.dtype(dtype).name} sizes {sizes.tolist()}"
        _check(out, r_out, dtype, what + ": out")
        assert not np.asarray(out[total:]).any(), what + ": rows past the groups are not zero"
        _check(d_lhs, r_lhs, dtype, what + ": d lhs")
        assert not np.isnan(np.asarray(d_rhs, np.float32)).any(), what
        _check(d_rhs, r_rhs, dtype, what + ": d rhs")
        empty = np.asarray(sizes) == 0
        assert not np.asarray(d_rhs)[empty].any(), what + ": an empty group's gradient is not zero"
        if part is None:
            continue
        # One shard's experts (offset..offset+1): their rows, zeros elsewhere; their gradients.
        p_out, p_lhs, p_rhs = part
        starts = np.concatenate([[0], np.cumsum(np.asarray(sizes))])
        mine = (np.arange(M) >= starts[offset]) & (np.arange(M) < starts[offset + 2])
        _check(p_out, np.where(mine[:, None], np.asarray(r_out, np.float32), 0), dtype, what + ": shard out")
        p_lhs_want = jax.lax.ragged_dot(cot, jnp.swapaxes(rhs, 1, 2) * jnp.asarray(
            (np.arange(E) >= offset) & (np.arange(E) < offset + 2), dtype)[:, None, None], sizes)
        _check(p_lhs, p_lhs_want, dtype, what + ": shard d lhs")
        _check(p_rhs, r_rhs[offset:offset + 2], dtype, what + ": shard d rhs")


@pytest.mark.parametrize("lowering,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                      ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_both_lowerings_emit_device_kernels(lowering, platform, marker):
    """The model's kind of shapes (bf16, blocks the default) lower, forward and backward, to
    Mosaic / Triton kernels without the device (compiling them to machine code needs one)."""
    config = kernel_config(lowering, interpret=False, platform=platform)
    lhs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((4, 512, 1024), jnp.bfloat16)

    def train_like(a, b, sizes):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, config=config), a, b)
        return out, vjp(out)

    text = jax.jit(train_like).trace(lhs, rhs, jax.ShapeDtypeStruct((4,), jnp.int32)).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 3  # gmm, gmm with rhs transposed (d lhs), tgmm (d rhs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"lhs \[m, k\] and rhs \[G, k, n\]"):
        gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 2)), jnp.array([2, 2]))
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)), jnp.array([4]))
