"""The layer-stepped model decodes exactly as decoding.py (greedy and beam; dense and MoE
layers mixed; scanned layers); an MoE model's greedy tokens through decoding.py are its
teacher-forced argmax."""
import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax import decoding
from cpm2_jax.model.transformer import EncoderDecoder
from cpm2_jax.offload.stepped import SteppedModel
from tests.offload.models import inputs, tiny

MAX_NEW = 6


def test_greedy_and_beam_equal_decoding_dense_and_moe_layers():
    c, params = tiny(moe=True, sparse_step=2)  # layer 0 of each stack dense, layer 1 MoE
    assert [c.is_moe_layer("decoder", i) for i in range(2)] == [False, True]
    enc = inputs()
    model = SteppedModel(c, params)
    ref = decoding.greedy(params, enc, config=c, max_new_tokens=MAX_NEW)
    got = model.greedy(enc, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(ref.scores), rtol=1e-5, atol=1e-5)
    kw = dict(num_beams=2, max_new_tokens=3, length_penalty=0.6, early_stopping=False)  # eager beam loop: kept short
    ref = decoding.beam_search(params, enc, config=c, **kw)
    got = model.beam_search(enc, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(ref.scores), rtol=1e-5, atol=1e-5)


def test_scanned_moe_greedy_equals_decoding():
    c, params = tiny(moe=True, scan=True)
    enc = inputs()
    ref = decoding.greedy(params, enc, config=c, max_new_tokens=MAX_NEW)
    got = SteppedModel(c, params).greedy(enc, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))


def test_moe_greedy_tokens_are_the_teacher_forced_argmax():
    """decoding.py on an MoE model: its single-token steps route one token per group, the
    teacher-forced pass routes whole sequences; with dropless argmax routing the tokens agree."""
    c, params = tiny(moe=True)
    enc = inputs()
    out = decoding.greedy(params, enc, config=c, max_new_tokens=MAX_NEW)
    tokens = np.asarray(out.tokens)
    dec_in = np.concatenate([np.zeros((tokens.shape[0], 1), np.int32), tokens[:, :-1]], axis=1)
    logits = jax.jit(EncoderDecoder(c).apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in))
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    for row, n in zip(range(tokens.shape[0]), np.asarray(out.lengths)):
        np.testing.assert_array_equal(tokens[row, :n], argmax[row, :n])
    assert len(set(tokens.ravel().tolist())) > 2  # not a degenerate constant output
