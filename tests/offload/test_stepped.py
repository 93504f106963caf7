"""The layer-stepped model decodes exactly as decoding.py (greedy and beam; dense and MoE
layers mixed; scanned layers); an MoE model's greedy tokens through decoding.py are its
teacher-forced argmax."""
import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax import decoding
from cpm2_jax.model.transformer import EncoderDecoder
from cpm2_jax.offload.stepped import Static, SteppedModel
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


def _shared_routers(params: dict) -> dict:
    """The MoE model with every layer of a stack routing by its first layer's router."""
    params = jax.tree.map(lambda a: a, params)  # a copy of the nesting
    for stack in ("encoder", "decoder"):
        first = params[stack]["layers_0"]["moe"]["router"]
        for name, layer in params[stack].items():
            if name.startswith("layers_") and "moe" in layer:
                params[stack][name] = {**layer, "moe": {**layer["moe"], "router": first}}
    return params


def test_lookahead_guess_is_the_next_layers_router_on_this_layers_input():
    """With every layer of a stack routing by one router, the next layer's router on this
    layer's input routes exactly as this layer: the guess equals this layer's counts. The last
    MoE layer of a stack has no guess, and lookahead never changes the tokens."""
    c, own = tiny(moe=True)
    enc = inputs()

    def guesses(params):
        seen = []
        model = SteppedModel(c, params, lookahead=True)

        def rows(stack, index, routed, out, guess=None):
            seen.append((stack, index, np.asarray(routed.counts), None if guess is None else np.asarray(guess)))
            return model.resident_moe_rows(stack, index, routed, out)

        model.moe_rows = rows
        got = model.greedy(enc, max_new_tokens=4)
        plain = SteppedModel(c, params).greedy(enc, max_new_tokens=4)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
        last = {s: max(i for t, i, *_ in seen if t == s) for s in ("encoder", "decoder")}
        assert all((guess is None) == (index == last[stack]) for stack, index, _, guess in seen)
        guessed = [(counts, guess) for stack, index, counts, guess in seen if index != last[stack]]
        assert len(guessed) == 1 + 4  # the encoder's first layer, the decoder's first at each step
        return guessed

    for counts, guess in guesses(_shared_routers(own)):
        np.testing.assert_array_equal(guess, counts)
    # Each layer with its own router: the guesses are that router's, not this layer's routing.
    assert any((guess != counts).any() for counts, guess in guesses(own))


def test_static_holders_hash_once_and_equal_modules_share_a_compilation():
    """Two models of one config: their holders are equal (one jit cache entry for both), each
    holder's hash is the one stored when made, and a holder never equals its bare value."""
    c, params = tiny(moe=True)
    a, b = SteppedModel(c, params), SteppedModel(c, params)
    assert a._static_dec_moe is not b._static_dec_moe
    assert a._static_dec_moe == b._static_dec_moe and hash(a._static_dec_moe) == hash(b._static_dec_moe)
    assert hash(a._static_dec_moe) == hash((a._dec_attention, a._moe_input))
    assert Static(1) != 1 and Static(1) != Static(2)
