"""What a prompt-tuning step keeps for its backward pass (benchmarks/prompt_memory.py): a frozen
weight keeps no inputs for a weight gradient (hand-written CPU VJPs included), and the slim
VJPs of RMSNorm, the GELU gate and attention's softmax give autodiff's gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import losses
from cpm2_jax.config import get_config
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.model.attention import _softmax_values, dot_product_attention
from cpm2_jax.model.dense import linear
from cpm2_jax.model.feedforward import _gated_gelu_2d, gelu, gelu_gate
from cpm2_jax.model.norm import _rms_norm, rms_norm
from cpm2_jax.prompts import PromptConfig

RNG = np.random.default_rng(0)


def _normal(*shape, dtype=jnp.float32):
    return jnp.asarray(RNG.normal(size=shape), dtype)


def _residuals(fn, *args):
    """The arrays the backward pass of `fn` keeps: the leaves of its VJP function."""
    return [x for x in jax.tree_util.tree_leaves(jax.vjp(fn, *args)[1]) if hasattr(x, "shape")]


def _residual_shapes(fn, *args):
    return [tuple(x.shape) for x in _residuals(fn, *args)]


def test_frozen_linear_keeps_no_input_and_gives_the_input_gradient():
    x, w, dy = _normal(6, 5), _normal(5, 3), _normal(6, 3)
    frozen = lambda x: jnp.sum(linear(x, w) * dy)  # noqa: E731
    assert (6, 5) not in _residual_shapes(frozen, x)  # only w: dx = dy w^T
    assert (6, 5) in _residual_shapes(lambda x, w: jnp.sum(linear(x, w) * dy), x, w)  # x for dw
    np.testing.assert_allclose(jax.grad(frozen)(x), dy @ w.T, rtol=1e-6)
    dx, dw = jax.grad(lambda x, w: jnp.sum(linear(x, w) * dy), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dw, x.T @ dy, rtol=1e-5)


def test_frozen_gated_gelu_keeps_no_input_or_hidden_and_gives_autodiff_dx():
    x, wi_0, wi_1, wo = _normal(6, 4), _normal(4, 8), _normal(4, 8), _normal(8, 4)
    frozen = lambda x: jnp.sum(jnp.sin(_gated_gelu_2d(x, wi_0, wi_1, wo)))  # noqa: E731
    plain = lambda x: jnp.sum(jnp.sin((gelu(x @ wi_0) * (x @ wi_1)) @ wo))  # noqa: E731
    shapes = _residual_shapes(frozen, x)
    # a, b and the weights; the (6, 4) array is sin's cosine of y, not x: no x, g or h.
    assert shapes.count((6, 4)) == 1 and shapes.count((6, 8)) == 2
    np.testing.assert_allclose(jax.grad(frozen)(x), jax.grad(plain)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_slim_norm_and_gate_give_autodiff_gradients_exactly(dtype):
    x, scale, dy = _normal(3, 7, 16, dtype=dtype), _normal(16), _normal(3, 7, 16, dtype=dtype)
    slim = jax.grad(lambda x, s: jnp.sum((rms_norm(x, s) * dy).astype(jnp.float32)), argnums=(0, 1))(x, scale)
    ref = jax.grad(lambda x, s: jnp.sum((_rms_norm(x, s, 1e-6, dtype) * dy).astype(jnp.float32)),
                   argnums=(0, 1))(x, scale)
    for a, b in zip(slim, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert _residual_shapes(lambda x: jnp.sum(rms_norm(x, scale).astype(jnp.float32)), x) == [(3, 7, 16), (16,)]
    a, b, dh = _normal(5, 9, dtype=dtype), _normal(5, 9, dtype=dtype), _normal(5, 9, dtype=dtype)
    slim = jax.grad(lambda a, b: jnp.sum((gelu_gate(a, b) * dh).astype(jnp.float32)), argnums=(0, 1))(a, b)
    ref = jax.grad(lambda a, b: jnp.sum((gelu(a) * b * dh).astype(jnp.float32)), argnums=(0, 1))(a, b)
    for s, r in zip(slim, ref):
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(r, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_values_keeps_the_float32_weights_alone(dtype):
    logits, v, dout = _normal(2, 3, 5, 7), _normal(2, 7, 3, 4, dtype=dtype), _normal(2, 5, 3, 4, dtype=dtype)
    logits = logits.at[0, :, :, 5:].add(-1e10)  # masked keys

    def ref(logits, v):
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.sum((jnp.einsum("bhqk,bkhd->bqhd", weights, v) * dout).astype(jnp.float32))

    def slim(logits, v):
        return jnp.sum((_softmax_values(logits, v, jnp.dtype(dtype)) * dout).astype(jnp.float32))

    # y (float32, once), v, and dout (this test's own product): no exp(logits), no dtype copy of y.
    kept = sorted((tuple(x.shape), str(x.dtype)) for x in _residuals(slim, logits, v))
    assert kept == sorted([((2, 3, 5, 7), "float32"), ((2, 7, 3, 4), jnp.dtype(dtype).name),
                           ((2, 5, 3, 4), jnp.dtype(dtype).name)]), kept
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
    for s, r in zip(jax.grad(slim, argnums=(0, 1))(logits, v), jax.grad(ref, argnums=(0, 1))(logits, v)):
        np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(r, np.float32), **tol)


def test_prompt_step_keeps_no_more_with_the_hand_written_vjps_than_with_autodiff():
    """A prompt-tuning objective over a frozen backbone: the CPU weight-gradient VJPs ('on')
    keep no more residual bytes than plain autodiff ('off'), which keeps no matmul input."""
    prompt = PromptConfig(length=4, init="normal")
    enc, dec = jnp.full((2, 10), 5, jnp.int32), jnp.full((2, 6), 7, jnp.int32)

    def residual_bytes(setting):
        config = get_config("tiny", vocab_size=64, prompt=prompt, cpu_weight_grads=setting,
                            num_encoder_layers=1, num_decoder_layers=1)
        model = EncoderDecoder(config)
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), enc, dec)["params"])

        def objective(table):
            logits = model.apply({"params": {**params, "prompt": {"table": table}}}, enc, dec)
            return losses.weighted_cross_entropy(logits, dec, jnp.ones(dec.shape))[0]

        table = params["prompt"]["table"]
        grad = jax.grad(objective)(table)
        return sum(x.size * x.dtype.itemsize for x in _residuals(objective, table)), grad

    on, grad_on = residual_bytes("on")
    off, grad_off = residual_bytes("off")
    assert on <= off
    np.testing.assert_allclose(grad_on, grad_off, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recomputed_attention_keeps_no_weights_and_gives_autodiff_gradients(dtype):
    """ModelConfig.attention_recompute: the backward keeps q, k, v, the bias and log Z [b, h, q, 1];
    no [b, h, q, k] array; gradients (bias included) equal autodiff of the softmax."""
    q, k, v = _normal(2, 5, 3, 4, dtype=dtype), _normal(2, 7, 3, 4, dtype=dtype), _normal(2, 7, 3, 4, dtype=dtype)
    bias = jnp.broadcast_to(_normal(1, 3, 5, 7) + jnp.where(jnp.arange(7) < 5, 0.0, -1e10), (2, 3, 5, 7))
    dout = _normal(2, 5, 3, 4, dtype=dtype)

    def ref(q, k, v, b):
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + b, -1)
        return jnp.sum((jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v) * dout).astype(jnp.float32))

    def recomputed(q, k, v, b):
        return jnp.sum((dot_product_attention(q, k, v, b, dtype=dtype, recompute=True) * dout).astype(jnp.float32))

    kept = {tuple(x.shape) for x in _residuals(recomputed, q, k, v, bias)}
    assert (2, 3, 5, 7) not in kept - {tuple(bias.shape)} and (2, 3, 5, 1) in kept
    assert sum(tuple(x.shape) == (2, 3, 5, 7) for x in _residuals(recomputed, q, k, v, bias)) == 1  # the bias
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    grads = jax.grad(recomputed, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for s, r in zip(grads, jax.grad(ref, argnums=(0, 1, 2, 3))(q, k, v, bias)):
        np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(r, np.float32), **tol)


def test_scanned_prompt_step_keeps_no_copy_of_the_frozen_kernels_and_recompute_drops_the_weights():
    """Under nn.scan a frozen kernel is its layer's own slice, forwarded to the backward pass, not
    stacked into a second backbone (Projection contracts it in its own shape); with
    attention_recompute no [layers, b, h, q, k] weights are kept; the prompt gradient agrees."""
    from jax._src.ad_checkpoint import saved_residuals

    prompt = PromptConfig(length=4, init="normal")
    enc, dec = jnp.full((2, 10), 5, jnp.int32), jnp.full((2, 6), 7, jnp.int32)
    config = get_config("tiny", vocab_size=64, prompt=prompt, scan_layers=True, init_std=0.05, cpu_weight_grads="off",
                        num_encoder_layers=2, num_decoder_layers=1)
    params = nn.unbox(jax.jit(EncoderDecoder(config).init)(jax.random.PRNGKey(0), enc, dec)["params"])
    kernels = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params) if x.ndim > 2}  # stacked weights

    def stacked_and_grad(recompute):
        model = EncoderDecoder(config.replace(attention_recompute=recompute))

        def objective(table):
            logits = model.apply({"params": {**params, "prompt": {"table": table}}}, enc, dec)
            return losses.weighted_cross_entropy(logits, dec, jnp.ones(dec.shape))[0]

        table = params["prompt"]["table"]
        made = [tuple(a.shape) for a, source in saved_residuals(objective, table) if "output of scan" in source]
        return made, jax.jit(jax.grad(objective))(table)

    stored, grad = stacked_and_grad(False)
    recomputed, grad_recomputed = stacked_and_grad(True)
    assert not set(stored) & kernels and not set(recomputed) & kernels, kernels  # no stacked weight copies
    weights = (2, 2, 4, 14, 14)  # [layers, batch, heads, q, k] of the encoder (10 tokens + 4 prompt vectors)
    assert weights in stored and weights not in recomputed
    np.testing.assert_allclose(grad_recomputed, grad, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(grad))))
