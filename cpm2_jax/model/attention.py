"""Multi-head attention without 1/sqrt(d) scaling or biases, and T5 relative position buckets.

CPM2_FACTS "Dense model": no attention scaling (T5 convention), no biases; relative position
bias with 32 buckets and max distance 128, bidirectional in the encoder, causal in the
decoder, computed once per stack and shared by every layer (`RelativePositionBias` lives at
the stack level, not in each layer).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import dtype_of
from cpm2_jax.model.dense import DECODE_WEIGHTS, Projection, normal_init, stacked_projections

# Added to the logits of masked positions. Finite (not -inf) so a fully masked row (a padded
# query) gives a uniform distribution instead of NaN.
MASK_VALUE = -1e10


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """T5's bucket of (key position - query position).

    Half the buckets (all of them when causal) hold exact offsets 0..max_exact-1; the rest
    grow logarithmically up to `max_distance`, beyond which everything shares the last bucket:
        bucket = max_exact + floor(log(n / max_exact) / log(max_distance / max_exact)
                                   * (num_buckets - max_exact)),   n = |offset| >= max_exact.
    In bidirectional mode, positive offsets (keys after the query) use the upper half.
    """
    ret = jnp.zeros_like(relative_position)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n > 0).astype(ret.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(-n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log, as mT5 computes it (bucket edges then agree with transformers exactly).
    scaled = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(ret.dtype), num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Per-head scalar bias b[h, bucket(k - q)], a [heads, buckets] table shared by a stack."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    init_std: float = 0.001
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset=0) -> jax.Array:
        """Returns [1, heads, q_len, k_len] float32. `q_offset` shifts query positions (decoding)."""
        table = self.param("rel_embedding", nn.with_logical_partitioning(normal_init(self.init_std), ("heads", "relpos_buckets")),
                           (self.num_heads, self.num_buckets), dtype_of(self.param_dtype))
        q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
        k_pos = jnp.arange(k_len, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [heads, q, k]
        return bias[None]


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean [batch, 1|heads, q, k] mask (True = attend) -> additive float32 bias."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


def attention_mask(q_valid: Optional[jax.Array], k_valid: jax.Array, *, causal: bool = False,
                   q_segment: Optional[jax.Array] = None, k_segment: Optional[jax.Array] = None) -> jax.Array:
    """[batch, 1, q|1, k] boolean mask: key is valid, same packed segment, and (causal) not ahead.

    Padding is masked on the key side only: queries at padded positions keep their valid
    keys (as transformers does), so their outputs are finite and simply ignored by the loss.
    `q_valid` only supplies the query length (needed when causal).
    """
    mask = k_valid[:, None, None, :]
    if q_segment is not None and k_segment is not None:
        mask = mask & (q_segment[:, None, :, None] == k_segment[:, None, None, :])
    if causal:
        if q_valid is None:
            raise ValueError("a causal mask needs q_valid for the query length")
        q_len, k_len = q_valid.shape[-1], k_valid.shape[-1]
        mask = mask & (jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :])[None, None]
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
                          dropout=None, dtype=jnp.float32, recompute: bool = False) -> jax.Array:
    """softmax(q k^T + bias) v with no 1/sqrt(d) scaling; logits and softmax in float32.

    q: [b, q, h, d]; k, v: [b, k, h, d]; bias: broadcastable to [b, h, q, k].
    `recompute` (ModelConfig.attention_recompute, without dropout): the backward pass
    recomputes the weights instead of keeping them (`_recomputed_attention`).
    """
    if dropout is None and recompute:
        return _recomputed_attention(q, k, v, bias, jnp.dtype(dtype))
    logits = _attention_logits(q, k, bias)
    if dropout is None:
        return _softmax_values(logits, v, jnp.dtype(dtype))
    weights = dropout(jax.nn.softmax(logits, axis=-1))  # logits include the bias
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_values(logits: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """softmax(logits) v, the weights cast to `dtype` for the product (logits [b, h, q, k]
    float32, v [b, k, h, d]). Its backward pass keeps the float32 weights y and v alone:
    dv = y^T dout (y cast again) and dlogits = y (dy - sum(y dy)); autodiff would also keep
    exp(logits), its normaliser and the `dtype` copy of y. Gradients equal autodiff's up to
    float rounding."""
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(dtype), v)


def _softmax_values_fwd(logits, v, dtype):
    y = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", y.astype(dtype), v), (y, v)


def _softmax_values_bwd(dtype, res, dout):
    y, v = res
    dv = jnp.einsum("bhqk,bqhd->bkhd", y.astype(dtype), dout)
    dy = jnp.einsum("bqhd,bkhd->bhqk", dout, v).astype(jnp.float32)
    return _weights_grad(y, dy), dv


_softmax_values.defvjp(_softmax_values_fwd, _softmax_values_bwd)


def _attention_logits(q, k, bias):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias


def _weights_grad(y, dy):
    """d logits of y = softmax(logits) from dy: y (dy - sum(y dy))."""
    return y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _recomputed_attention(q, k, v, bias, dtype):
    """softmax(q k^T + bias) v (weights cast to `dtype` for the product) whose backward pass
    keeps q, k, v, the bias and log Z [b, h, q, 1] alone: y = exp(logits - log Z) is
    recomputed there (one more q k^T) instead of kept, O(b h q) float32 instead of O(b h q k)."""
    return _recomputed_attention_fwd(q, k, v, bias, dtype)[0]


def _recomputed_attention_fwd(q, k, v, bias, dtype):
    logits = _attention_logits(q, k, bias)
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    y = jnp.exp(logits - log_z)
    return jnp.einsum("bhqk,bkhd->bqhd", y.astype(dtype), v), (q, k, v, bias, log_z)


def _recomputed_attention_bwd(dtype, res, dout):
    q, k, v, bias, log_z = res
    logits, logits_vjp = jax.vjp(_attention_logits, q, k, bias)
    y = jnp.exp(logits - log_z)
    dv = jnp.einsum("bhqk,bqhd->bkhd", y.astype(dtype), dout)
    dy = jnp.einsum("bqhd,bkhd->bhqk", dout, v).astype(jnp.float32)
    dq, dk, dbias = logits_vjp(_weights_grad(y, dy))
    return dq, dk, dv, dbias


_recomputed_attention.defvjp(_recomputed_attention_fwd, _recomputed_attention_bwd)


def single_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
                           dropout=None, dtype=jnp.float32) -> jax.Array:
    """`dot_product_attention` for one query position (a decoding step on CPU), as matmuls over
    the caches' own [b, k, h * d] layout: with heads as a batch dimension, XLA:CPU copies both
    (loop-invariant) encoder caches of every layer into a [b, h, d, k] layout at every step.
    The query becomes a block-diagonal [h * d, h] matrix (head g's query in block g) and the
    output is the diagonal of [h, h, d]: h times the attention arithmetic of one step, small
    beside reading the caches (the case this is for: few heads, short encoder inputs).

    q: [b, 1, h, d]; k, v: [b, k, h, d]; bias: broadcastable to [b, h, 1, k].
    """
    b, _, h, d = q.shape
    length = k.shape[1]
    block_q = (q[:, 0, :, :, None] * jnp.eye(h, dtype=q.dtype)[None, :, None, :]).reshape(b, h * d, h)
    logits = jnp.einsum("bkc,bcg->bgk", k.reshape(b, length, h * d), block_q, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits[:, :, None, :] + bias, axis=-1)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum("bgk,bkc->bgc", weights[:, :, 0, :].astype(dtype), v.reshape(b, length, h * d))
    return jnp.einsum("bhhd->bhd", out.reshape(b, h, h, d))[:, None]


def transposed_cache_attention(q: jax.Array, key_t: jax.Array, value_t: jax.Array, bias: jax.Array, *,
                               dropout=None, dtype=jnp.float32) -> jax.Array:
    """`dot_product_attention` for one query position over encoder keys/values laid out per
    head (built once per decoding call, `decoding.cross_attention_layouts`): key_t [b, h, d, k],
    value_t [b, h, k, d]. Each head is then one matrix-vector product per product, read in
    place: XLA:CPU runs them single-threaded, where `single_query_attention`'s small [h, k]
    matmuls wake the second core (~3x slower per decoding step at mT5-small's shape).

    q: [b, 1, h, d]; bias: broadcastable to [b, h, 1, k]. Returns [b, 1, h, d].
    """
    logits = jnp.einsum("bhd,bhdk->bhk", q[:, 0], key_t, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits[:, :, None, :] + bias, axis=-1)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhk,bhkd->bhd", weights[:, :, 0, :].astype(dtype), value_t)[:, None]


class MultiHeadAttention(nn.Module):
    """Bias-free multi-head attention with optional autoregressive KV cache.

    decode=True, self-attention: keys/values of each step are written into `cached_key` /
    `cached_value` [batch, max_len, heads, head_dim] at `cache_index` (passed in by the stack).
    decode=True, cross-attention: the projected encoder keys/values are read from
    `cached_key`/`cached_value` [batch, encoder_length, heads, head_dim], filled once before
    the first step (`decoding.init_cache`; the cache-shaping pass computes them too).
    A decoding step's cross-attention on CPU attends with `single_query_attention`; its
    self-attention projects with one stacked [embed, 3, heads, kv] kernel when the caller
    passes one (collection `DECODE_WEIGHTS`, entry "qkv").
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    init_std: float = 0.001
    dtype: str = "float32"
    param_dtype: str = "float32"
    deterministic: bool = True
    decode: bool = False
    is_cross_attention: bool = False
    cpu_weight_grads: str = "auto"  # ModelConfig.cpu_weight_grads
    recompute: bool = False  # ModelConfig.attention_recompute

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array,
                 cache_index: Optional[jax.Array] = None) -> jax.Array:
        d_model = inputs_q.shape[-1]
        proj = dict(features=(self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                    init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                    cpu_weight_grads=self.cpu_weight_grads)

        def project_kv():
            return (Projection(name="key", **proj)(inputs_kv), Projection(name="value", **proj)(inputs_kv))

        stacked = self.decode and not self.is_cross_attention and self.has_variable(DECODE_WEIGHTS, "qkv")
        if stacked:  # a decoding step: query, key and value from one matmul (decoding.decode_weights)
            query, key, value = stacked_projections(inputs_q, self.get_variable(DECODE_WEIGHTS, "qkv"),
                                                    dtype_of(self.dtype))
        else:
            query = Projection(name="query", **proj)(inputs_q)
        if self.decode and self.is_cross_attention:
            key, value = self._cached_cross_kv(project_kv, inputs_kv)
        elif stacked:
            key, value = self._update_self_cache(key, value, cache_index)
        elif self.decode:
            key, value = project_kv()
            key, value = self._update_self_cache(key, value, cache_index)
        else:
            key, value = project_kv()
        axes = ("batch", "length", "heads", "kv")
        query, key, value = (nn.with_logical_constraint(t, axes) for t in (query, key, value))
        drop = None
        if self.dropout_rate > 0.0 and not self.deterministic:
            drop = lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=False)  # noqa: E731
        # A decoding step's cross-attention on CPU reads the (loop-invariant) encoder caches as
        # they are; self-attention keeps the matmuls (its cache is updated in place each step,
        # and a reshaped view of the updated buffer makes XLA:CPU copy the whole cache).
        cross_step = self.decode and self.is_cross_attention and query.shape[1] == 1
        attend = single_query_attention if cross_step and jax.default_backend() == "cpu" else dot_product_attention
        extra = {} if attend is single_query_attention else {"recompute": self.recompute}
        if cross_step and self.has_variable(DECODE_WEIGHTS, "key_t"):  # per-head layouts (decoding.make_step)
            attend, extra = transposed_cache_attention, {}
            key, value = self.get_variable(DECODE_WEIGHTS, "key_t"), self.get_variable(DECODE_WEIGHTS, "value_t")
        out = attend(query, key, value, bias, dropout=drop, dtype=dtype_of(self.dtype), **extra)
        out = nn.with_logical_constraint(out, axes)
        return Projection(features=(d_model,), kernel_axes=("heads", "kv", "embed"), num_input_axes=2,
                          init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                          cpu_weight_grads=self.cpu_weight_grads, name="out")(out)

    def _update_self_cache(self, key, value, cache_index):
        """Writes this step's keys/values at `cache_index`.. ; returns the whole cache."""
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        if not initialised:
            # The cache-shaping pass (model.init with the full decode length): nothing to write.
            return key, value
        # A step writes its new positions (one per token; a decoder prompt's M at once) at cache_index.
        idx = jnp.asarray(cache_index, jnp.int32)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), (0, idx, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype), (0, idx, 0, 0))
        return cached_key.value, cached_value.value

    def _cached_cross_kv(self, project_kv, inputs_kv):
        """Encoder keys/values: projected by the cache-shaping pass, read from the cache after
        (filled once per input by `decoding.init_cache`, not recomputed at every step)."""
        shape = inputs_kv.shape[:2] + (self.num_heads, self.head_dim)
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, dtype_of(self.dtype))
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, dtype_of(self.dtype))
        if initialised:
            return cached_key.value, cached_value.value
        key, value = project_kv()
        cached_key.value, cached_value.value = key.astype(cached_key.value.dtype), value.astype(cached_value.value.dtype)
        return key, value
