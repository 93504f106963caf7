"""Relative position buckets (brute force from the bucket definition and transformers'
implementation), unscaled attention (and its one-query decoding form) and the masks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.model.attention import (attention_mask, dot_product_attention, mask_to_bias, relative_position_bucket,
                                      single_query_attention, transposed_cache_attention)


def brute_force_bucket(offset: int, bidirectional: bool, num_buckets=32, max_distance=128) -> int:
    """The bucket by its definition, with exact (float64) logarithms."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if offset > 0:
            bucket += num_buckets
        n = abs(offset)
    else:
        n = max(-offset, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact) + 1e-9)
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_definition(bidirectional):
    offsets = np.arange(-600, 601)
    got = np.asarray(relative_position_bucket(jnp.asarray(offsets), bidirectional=bidirectional))
    want = np.array([brute_force_bucket(int(o), bidirectional) for o in offsets])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_transformers(bidirectional):
    torch = pytest.importorskip("torch")
    from transformers.models.mt5.modeling_mt5 import MT5Attention

    offsets = np.arange(-600, 601)
    want = MT5Attention._relative_position_bucket(torch.tensor(offsets), bidirectional=bidirectional,
                                                  num_buckets=32, max_distance=128).numpy()
    got = np.asarray(relative_position_bucket(jnp.asarray(offsets), bidirectional=bidirectional))
    np.testing.assert_array_equal(got, want)


def test_attention_is_unscaled():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(3))
    out = dot_product_attention(q, k, v, jnp.zeros((1, 1, 3, 3)))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", w, v), rtol=1e-5, atol=1e-6)


def test_dropout_and_recompute_paths_add_the_bias_once():
    """With a dropout that keeps everything, and with recomputed weights, attention equals the
    plain path: a numpy softmax(q k^T + bias) v (the dropout path once added the bias twice)."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 2, 4)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, 2, 3, 3)), jnp.float32)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + np.asarray(bias)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
    for out in (dot_product_attention(q, k, v, bias, dropout=lambda x: x),
                dot_product_attention(q, k, v, bias, recompute=True)):
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_single_query_attention_equals_dot_product_attention():
    """The decoding step's block-diagonal and per-head forms give the two-matmul result, masked keys included."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(3, 1, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 7, 4, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4], [1]]))
    bias = jnp.asarray(rng.normal(size=(1, 4, 1, 7)), jnp.float32) + mask_to_bias(valid[:, None, None, :])
    want = np.asarray(dot_product_attention(q, k, v, bias))
    np.testing.assert_allclose(np.asarray(single_query_attention(q, k, v, bias)), want, rtol=1e-5, atol=1e-6)
    # and the per-head form over keys/values transposed once per decoding call
    per_head = transposed_cache_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), bias)
    np.testing.assert_allclose(np.asarray(per_head), want, rtol=1e-5, atol=1e-6)


def test_masks():
    valid = jnp.array([[True, True, False]])
    m = attention_mask(valid, valid)
    assert m.shape == (1, 1, 1, 3) and not bool(m[0, 0, 0, 2]) and bool(m[0, 0, 0, 1])
    c = attention_mask(valid, valid, causal=True)
    assert c.shape == (1, 1, 3, 3) and bool(c[0, 0, 1, 0]) and not bool(c[0, 0, 0, 1]) and not bool(c[0, 0, 2, 2])
    seg = jnp.array([[1, 1, 2]])
    s = attention_mask(jnp.ones((1, 3), bool), jnp.ones((1, 3), bool), q_segment=seg, k_segment=seg)
    np.testing.assert_array_equal(np.asarray(s[0, 0]), [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
