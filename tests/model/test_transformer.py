"""Whole-model properties: scanned == unscanned, padding and packing invariance, shared
embedding / untied head, dropout, bf16, remat and parameter count by formula."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.model import EncoderDecoder

ENC = jnp.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 12, 13, 14, 1]])
DEC = jnp.array([[0, 5, 6, 7, 0], [0, 3, 4, 5, 6]])


def init(config, enc=ENC, dec=DEC, seed=0, gain=300.0):
    model = EncoderDecoder(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), enc, dec))["params"]
    # Larger weights than the 0.001 init so every component visibly moves the logits.
    params = jax.tree_util.tree_map(lambda p: p * gain if p.ndim > 1 else p, params)
    return model, params


def stack_layers(params):
    """Unscanned -> scanned layout: layers_i subtrees stacked on a new leading axis."""
    out = {}
    for name, sub in params.items():
        if isinstance(sub, dict) and "layers_0" in sub:
            n = sum(1 for k in sub if k.startswith("layers_"))
            layers = [sub[f"layers_{i}"] for i in range(n)]
            out[name] = {k: v for k, v in sub.items() if not k.startswith("layers_")}
            out[name]["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        else:
            out[name] = sub
    return out


def test_scanned_equals_unscanned():
    model, params = init(get_config("tiny"))
    scanned = EncoderDecoder(get_config("tiny", scan_layers=True))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ENC, DEC)),
                               np.asarray(scanned.apply({"params": stack_layers(params)}, ENC, DEC)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing_numerically(policy):
    model, params = init(get_config("tiny"))
    remat = EncoderDecoder(get_config("tiny", remat_policy=policy))
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ENC, DEC) ** 2)  # noqa: E731
    g1 = jax.jit(jax.grad(loss(model)))(params)  # one program each, not the backward pass op by op
    g2 = jax.jit(jax.grad(loss(remat)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def test_encoder_padding_does_not_change_logits():
    model, params = init(get_config("tiny"))
    short = model.apply({"params": params}, ENC[:, :7], DEC)
    padded = model.apply({"params": params}, jnp.pad(ENC, ((0, 0), (0, 5))), DEC)
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), rtol=1e-4, atol=1e-4)


def test_decoder_is_causal():
    model, params = init(get_config("tiny"))
    a = model.apply({"params": params}, ENC, DEC)
    b = model.apply({"params": params}, ENC, DEC.at[:, -1].set(42))
    np.testing.assert_allclose(np.asarray(a[:, :-1]), np.asarray(b[:, :-1]), atol=1e-5)
    assert not np.allclose(np.asarray(a[:, -1]), np.asarray(b[:, -1]))


def test_packing_equals_separate_examples():
    """Two examples packed into one row (segment ids) give the logits each gives alone."""
    model, params = init(get_config("tiny"))
    e1, e2 = jnp.array([[5, 6, 1]]), jnp.array([[7, 8, 9, 1]])
    d1, d2 = jnp.array([[0, 5, 6]]), jnp.array([[0, 7, 8]])
    packed = model.apply({"params": params}, jnp.concatenate([e1, e2], 1), jnp.concatenate([d1, d2], 1),
                         encoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2]]),
                         decoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2]]))
    alone1 = model.apply({"params": params}, e1, d1)
    # (float32 sums in another order: differences of a few 1e-6 relative on logits of a few units)
    np.testing.assert_allclose(np.asarray(packed[:, :3]), np.asarray(alone1), atol=1e-5, rtol=1e-5)
    # Relative positions within a packed row are offsets in the row, so the second example
    # matches on its own only through the segment mask; its logits must ignore example 1:
    packed_other = model.apply({"params": params}, jnp.concatenate([e1 + 3, e2], 1),
                               jnp.concatenate([d1 + 3, d2], 1),
                               encoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2]]),
                               decoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2]]))
    np.testing.assert_allclose(np.asarray(packed[:, 3:]), np.asarray(packed_other[:, 3:]), atol=1e-5)


def test_shared_embedding_and_untied_head():
    config = get_config("tiny")
    model, params = init(config)
    assert "embedding" in params["token_embedder"] and "token_embedder" not in params["encoder"]
    assert params["decoder"]["logits_dense"]["kernel"].shape == (config.d_model, config.vocab_size)
    # No d_model**-0.5 rescale: scaling the head scales the logits exactly.
    p2 = jax.tree_util.tree_map(lambda x: x, params)
    p2["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 2
    np.testing.assert_allclose(np.asarray(model.apply({"params": p2}, ENC, DEC)),
                               2 * np.asarray(model.apply({"params": params}, ENC, DEC)), rtol=1e-5)


def test_parameter_count_formula():
    c = get_config("tiny")
    _, params = init(c)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    attn = 4 * c.d_model * c.num_heads * c.head_dim
    ffn = 3 * c.d_model * c.d_ff
    want = (2 * c.vocab_size * c.d_model + 2 * c.num_heads * c.relative_attention_num_buckets
            + c.num_encoder_layers * (attn + ffn + 2 * c.d_model)
            + c.num_decoder_layers * (2 * attn + ffn + 3 * c.d_model) + 2 * c.d_model)
    assert n == want


def test_dropout_only_when_enabled():
    config = get_config("tiny", dropout_rate=0.1)
    model, params = init(config)
    base = model.apply({"params": params}, ENC, DEC)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(model.apply({"params": params}, ENC, DEC)))
    d1 = model.apply({"params": params}, ENC, DEC, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)})
    d2 = model.apply({"params": params}, ENC, DEC, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert not np.allclose(np.asarray(d1), np.asarray(base))


def test_bfloat16_compute_with_float32_params():
    config = get_config("tiny", dtype="bfloat16")
    # Unscaled attention turns bf16 rounding of large q/k into large logit errors, so this
    # test uses moderate weights (trained CPM-2 weights are moderate too).
    model, params = init(config, gain=30.0)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = model.apply({"params": params}, ENC, DEC)
    assert logits.dtype == jnp.bfloat16
    ref = EncoderDecoder(get_config("tiny")).apply({"params": params}, ENC, DEC)
    err = np.max(np.abs(np.asarray(logits, np.float32) - np.asarray(ref)))
    assert err < 0.05 * np.max(np.abs(np.asarray(ref))) + 1e-3


def test_bfloat16_params():
    config = get_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
    model = EncoderDecoder(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ENC, DEC))["params"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    assert np.isfinite(np.asarray(model.apply({"params": params}, ENC, DEC), np.float32)).all()
