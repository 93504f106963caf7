"""Decoding: the KV cache against full forward passes, greedy/beam against transformers'
`generate` on a converted MT5, sampling filters and determinism, scoring."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cpm2_jax import decoding
from cpm2_jax.config import get_config
from cpm2_jax.model.transformer import EncoderDecoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = get_config("tiny", vocab_size=128)
MAX_NEW = 12
N_EOS = 24


def _strip(row) -> list[int]:
    """Tokens up to and including the first EOS (what both libraries agree on; the padding differs)."""
    row = [int(t) for t in row]
    return row[:row.index(1) + 1] if 1 in row else row


def make_hf_model(config=CONFIG, seed=0):
    """A random MT5 whose greedy and beam outputs vary and end at different lengths.

    Plain random weights make a random T5 repeat one token forever, so the output matrix is
    built as noise plus 0.1 x a permuted copy of the input embedding (each token "suggests" a
    successor) and the EOS row as 0.1 x the sum of a dozen embeddings (a dozen tokens lead to EOS).
    """
    from cpm2_jax.convert.hf_mt5 import config_to_hf

    hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**config_to_hf(config, dtype="float32")))
    g = torch.Generator().manual_seed(seed)
    vocab, d = config.vocab_size, config.d_model
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        emb = hf.shared.weight
        head = torch.randn(vocab, d, generator=g) / d ** 0.5
        head[torch.randperm(vocab, generator=g)] += 0.1 * emb
        head[1] = torch.randn(d, generator=g) / d ** 0.5 + 0.1 * emb[torch.randperm(vocab, generator=g)[:N_EOS]].sum(0)
        hf.lm_head.weight.copy_(head)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_pair():
    from cpm2_jax.convert.hf_mt5 import params_from_hf_state_dict

    hf = make_hf_model()
    return hf, params_from_hf_state_dict(hf.state_dict(), CONFIG)


@pytest.fixture(scope="module")
def inputs():
    """Five rows with different amounts of right padding (one unpadded), then the first three
    again: 8 rows, so the batch splits over data=2 and every test shares one batch shape."""
    rng = np.random.RandomState(0)
    enc = rng.randint(2, CONFIG.vocab_size, size=(5, 9)).astype(np.int32)
    for row, length in enumerate((9, 6, 3, 7, 5)):
        enc[row, length:] = 0
    return np.concatenate([enc, enc[:3]])


@pytest.fixture(scope="module")
def one_device(hf_pair, inputs):
    """Greedy (MAX_NEW) and 2-beam search (8 new tokens) on one device: each compiled once and
    shared by the tests that compare against them."""
    _, params = hf_pair
    return (decoding.greedy(params, inputs, config=CONFIG, max_new_tokens=MAX_NEW),
            decoding.beam_search(params, inputs, config=CONFIG, num_beams=2, max_new_tokens=8))


def hf_generate(hf, enc, **kwargs):
    ids = torch.tensor(enc, dtype=torch.long)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=MAX_NEW,
                           do_sample=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _teacher_forced(scan: bool):
    """(config, params, enc, dec, full-pass logits, encoder states) of a tiny model, jitted and
    shared by the parametrisations below."""
    config = get_config("tiny", vocab_size=128, init_std=0.3, scan_layers=scan)
    model = EncoderDecoder(config)
    enc = jnp.array([[5, 6, 7, 8, 9, 1, 0], [9, 10, 1, 0, 0, 0, 0]], jnp.int32)
    dec = jnp.array([[0, 3, 4, 5, 6, 7], [0, 7, 8, 9, 2, 11]], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), enc, dec)["params"]
    full = jax.jit(model.apply)({"params": params}, enc, dec)
    encoded = jax.jit(lambda p, e: model.apply({"params": p}, e, method=model.encode))(params, enc)
    return config, params, enc, dec, full, encoded


@pytest.mark.parametrize("scan,stack", [(False, True), (True, True), (False, False)])
def test_cached_steps_equal_teacher_forced_logits(scan, stack):
    """Cached steps (with the stacked qkv / wi kernels of `decode_weights` and the per-head
    encoder keys/values of `cross_attention_layouts`, CPU's default, or the per-projection
    kernels) give the logits of one full forward pass."""
    config, params, enc, dec, full, encoded = _teacher_forced(scan)
    cache = jax.jit(decoding.init_cache, static_argnums=(0, 4))(config, params, encoded, enc, dec.shape[1])
    step = jax.jit(lambda p, e, tokens, cache: decoding.make_step(config, p, e, enc, stack_weights=stack,
                                                                  cache=cache)(tokens, cache))
    steps = []
    for t in range(dec.shape[1]):  # one compiled step, called once per position
        logits, cache = step(params, encoded, dec[:, t], cache)
        steps.append(logits)
    assert int(cache["decoder"]["cache_index"]) == dec.shape[1]
    if stack:  # the step really reads the stacked kernels: 3 fewer matmuls per (scanned) layer
        def matmuls(flag):
            fn = decoding.make_step(config, params, encoded, enc, stack_weights=flag)
            return str(jax.make_jaxpr(fn)(dec[:, 0], cache)).count("dot_general")
        assert matmuls(False) - matmuls(True) == 3 * (1 if scan else config.num_decoder_layers)
    np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=2e-4, rtol=1e-4)
    assert float(jnp.abs(full).max()) > 1.0  # not a degenerate near-zero model


# ---------------------------------------------------------------------------------------------
# Greedy and beam search against transformers
# ---------------------------------------------------------------------------------------------

def test_greedy_matches_hf_and_is_argmax_of_rescoring(hf_pair, inputs, one_device):
    hf, params = hf_pair
    out = one_device[0]
    ours = np.asarray(out.tokens)
    ref = hf_generate(hf, inputs).numpy()[:, 1:]
    assert [_strip(r) for r in ours] == [_strip(r) for r in ref]
    lengths = [len(_strip(r)) for r in ours]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 2  # rows really end at different steps
    assert list(np.asarray(out.lengths)) == lengths
    assert all((row[n:] == 0).all() for row, n in zip(ours, lengths))  # pad after EOS

    # Teacher-forcing the output reproduces each choice as the argmax, and the score as the log-likelihood.
    model = EncoderDecoder(CONFIG)
    dec_in = np.concatenate([np.zeros((len(ours), 1), np.int32), ours[:, :-1]], axis=1)
    logits = jax.jit(model.apply)({"params": params}, inputs, dec_in)
    argmax = np.asarray(jnp.argmax(logits, -1))
    for row, n in enumerate(lengths):
        assert list(argmax[row, :n]) == list(ours[row, :n])
    token_logp, total = decoding.score(params, inputs, ours, config=CONFIG)
    np.testing.assert_allclose(total, out.scores, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(token_logp)[ours == 0] == 0)


def test_weights_prepared_once_decode_exactly_as_weights_built_per_call(hf_pair, inputs, one_device):
    """`prepare_decode_weights` (built once per model, as infer and eval do) gives the tokens and
    scores of the per-call layouts bit for bit, greedy and beam; the steps really read them
    (a zeroed wo^T changes the output), and wo^T is wo transposed."""
    _, params = hf_pair
    weights = decoding.prepare_decode_weights(params, config=CONFIG)
    layer = weights["decoder"]["layers_0"]
    np.testing.assert_array_equal(layer["mlp"]["wo_t"], np.asarray(params["decoder"]["layers_0"]["mlp"]["wo"]).T)
    greedy = decoding.greedy(params, inputs, config=CONFIG, max_new_tokens=MAX_NEW, weights=weights)
    beam = decoding.beam_search(params, inputs, config=CONFIG, num_beams=2, max_new_tokens=8, weights=weights)
    for prepared, per_call in zip((greedy, beam), one_device):
        np.testing.assert_array_equal(prepared.tokens, per_call.tokens)
        np.testing.assert_array_equal(prepared.scores, per_call.scores)
    zeroed = jax.tree_util.tree_map(lambda x: x, weights)
    zeroed["decoder"]["layers_0"]["mlp"]["wo_t"] = jnp.zeros_like(layer["mlp"]["wo_t"])
    changed = decoding.greedy(params, inputs, config=CONFIG, max_new_tokens=MAX_NEW, weights=zeroed)
    assert not np.array_equal(changed.scores, greedy.scores)


@pytest.mark.parametrize("early_stopping,length_penalty,min_new", [(False, 1.0, 0), (True, 0.0, 3), ("never", 0.6, 0)])
def test_beam_search_matches_hf(hf_pair, inputs, early_stopping, length_penalty, min_new):
    hf, params = hf_pair
    beams = 3
    out = decoding.beam_search(params, inputs, config=CONFIG, num_beams=beams, max_new_tokens=MAX_NEW,
                               length_penalty=length_penalty, early_stopping=early_stopping,
                               min_new_tokens=min_new)
    ref = hf_generate(hf, inputs, num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping,
                      min_new_tokens=min_new, num_return_sequences=beams, output_scores=True,
                      return_dict_in_generate=True)
    ref_tokens = ref.sequences.numpy()[:, 1:].reshape(len(inputs), beams, -1)
    ours = np.asarray(out.tokens)
    assert [[_strip(b) for b in r] for r in ours] == [[_strip(b) for b in r] for r in ref_tokens]
    np.testing.assert_allclose(np.asarray(out.scores).ravel(), ref.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    assert min(len(_strip(b)) for b in ours[:, 0]) >= min_new + 1
    assert len({len(_strip(b)) for b in ours.reshape(-1, ours.shape[-1])}) > 2  # EOS at varied lengths


def test_scanned_layers_decode_the_same(hf_pair, inputs, one_device):
    from cpm2_jax.convert.hf_mt5 import params_from_hf_state_dict

    hf, params = hf_pair
    scanned = CONFIG.replace(scan_layers=True)
    scanned_params = params_from_hf_state_dict(hf.state_dict(), scanned)
    # Beam search is the harder case: the scanned cache ([layers, batch, ...]) is reordered every step.
    a = one_device[1]
    b = decoding.beam_search(scanned_params, inputs, config=scanned, num_beams=2, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def test_top_k_filter_hand_case():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(decoding.top_k_filter(logits, 2))
    assert list(np.isfinite(out[0])) == [False, True, False, False, True]
    assert list(np.isfinite(out[1])) == [True, True, False, False, False]
    np.testing.assert_array_equal(decoding.top_k_filter(logits, 0), logits)  # 0 disables


def test_top_p_filter_hand_case():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = jnp.log(jnp.asarray(probs))
    # Row 0 in descending order: 0.5, 0.3, 0.15, 0.05; p = 0.75 needs {0.5, 0.3} (mass 0.8).
    kept = np.isfinite(np.asarray(decoding.top_p_filter(logits, 0.75)))
    assert list(kept[0]) == [True, False, True, False]
    assert list(kept[1]) == [True, False, False, False]
    # p = 0.8 exactly reached by {0.5, 0.3}: nothing more is added; a tiny p keeps the top token only.
    assert list(np.isfinite(np.asarray(decoding.top_p_filter(logits, 0.79)))[0]) == [True, False, True, False]
    assert np.isfinite(np.asarray(decoding.top_p_filter(logits, 1e-6))).sum(-1).tolist() == [1, 1]
    np.testing.assert_array_equal(decoding.top_p_filter(logits, 1.0), logits)


def test_sampling_is_deterministic_per_key_and_top_k_1_is_greedy(hf_pair, inputs, one_device):
    _, params = hf_pair
    kw = dict(config=CONFIG, max_new_tokens=MAX_NEW, temperature=1.3, top_p=0.95)
    a = decoding.sample(params, inputs, jax.random.PRNGKey(1), **kw)
    b = decoding.sample(params, inputs, jax.random.PRNGKey(1), **kw)
    c = decoding.sample(params, inputs, jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # The reported score is the model's log-likelihood of the sample, as `score` computes it (for
    # rows without a sampled pad id before EOS, which `score` would read as padding).
    tokens = np.asarray(a.tokens)
    clean = [r for r in range(len(tokens)) if 0 not in _strip(tokens[r])]
    assert len(clean) >= 3
    rescored = decoding.score(params, inputs, tokens, config=CONFIG)[1]
    np.testing.assert_allclose(np.asarray(rescored)[clean], np.asarray(a.scores)[clean], rtol=1e-5, atol=1e-5)
    greedy = one_device[0]
    top1 = decoding.sample(params, inputs, jax.random.PRNGKey(3), config=CONFIG, max_new_tokens=MAX_NEW, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_length_penalties():
    assert float(decoding.hf_length_penalty(4, 0.5)) == pytest.approx(2.0)
    assert float(decoding.t5x_length_penalty(7, 1.0)) == pytest.approx(2.0)
    assert float(decoding.t5x_length_penalty(9, 0.0)) == 1.0 == float(decoding.hf_length_penalty(9, 0.0))
    with pytest.raises(ValueError, match="early_stopping"):
        decoding.beam_search({}, np.ones((1, 2), np.int32), config=CONFIG, num_beams=2, max_new_tokens=2,
                             early_stopping="sometimes")


# ---------------------------------------------------------------------------------------------
# Under a mesh
# ---------------------------------------------------------------------------------------------

def test_decoding_with_sharded_params_equals_one_device(hf_pair, inputs, one_device):
    """Parameters split by the partition rules over data=2, model=4 (8 fake CPU devices): greedy
    and beam search give the one-device tokens and scores; the KV cache follows the params."""
    import flax.linen as nn

    from cpm2_jax.partitioning import cpu_test_mesh, mesh_context, rules_for_mesh, shardings_for

    _, params = hf_pair
    mesh = cpu_test_mesh(data=2, model=4)
    rules = rules_for_mesh(mesh.axis_names)
    enc = inputs  # 8 rows: the batch splits over data
    abstract = jax.eval_shape(lambda: EncoderDecoder(CONFIG).init(jax.random.PRNGKey(0), enc[:, :2], enc[:, :2]))
    shardings = shardings_for(abstract, mesh, rules)["params"]
    sharded = jax.device_put(params, shardings)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
    want_greedy, want_beam = one_device
    with mesh_context(mesh), nn.logical_axis_rules(rules):
        tokens = jax.device_put(enc, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        got_greedy = decoding.greedy(sharded, tokens, config=CONFIG, max_new_tokens=MAX_NEW)
        got_beam = decoding.beam_search(sharded, tokens, config=CONFIG, num_beams=2, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(got_greedy.tokens), np.asarray(want_greedy.tokens))
    np.testing.assert_allclose(np.asarray(got_greedy.scores), np.asarray(want_greedy.scores), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_beam.tokens), np.asarray(want_beam.tokens))
    np.testing.assert_allclose(np.asarray(got_beam.scores), np.asarray(want_beam.scores), rtol=1e-4, atol=1e-4)
