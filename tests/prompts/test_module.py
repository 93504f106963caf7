"""The prompt inside the model: encoder input against a hand-built one, mask variants by what
they hide, the decoder prompt against the backbone fed the same vectors as tokens, decoding
against teacher forcing, a mixed-task batch against each task alone."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import decoding
from cpm2_jax.config import get_config
from cpm2_jax.errors import ConfigError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.prompts import PromptConfig
from cpm2_jax.prompts.module import padded_length

N, M = 4, 2  # encoder and decoder prompt vectors
PLACEMENTS = ("front", "middle", "back", "front:1+middle:1+back:2")
PROMPT = PromptConfig(length=N, num_tasks=len(PLACEMENTS), placement=PLACEMENTS, init="normal", decoder_length=M)
# Large init so logits vary (greedy and beam choices are not ties); two decoder layers, so the
# second layer's cached prompt keys/values depend on the first layer's prompt outputs.
CONFIG = get_config("tiny", vocab_size=64, init_std=0.3, prompt=PROMPT, num_encoder_layers=1)
ENCODER_ONLY = CONFIG.replace(prompt=PromptConfig(**{**PROMPT.to_dict(), "decoder_length": 0}))
TOKENS = jnp.asarray([[5, 6, 3, 7, 8, 1, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0],
                      [4, 11, 3, 12, 13, 14, 15, 1], [20, 21, 3, 22, 1, 0, 0, 0]], jnp.int32)
TASKS = jnp.asarray([0, 1, 2, 3], jnp.int32)
TARGETS = jnp.asarray([[7, 8, 9, 10, 1], [9, 1, 0, 0, 0], [5, 5, 6, 1, 0], [6, 2, 1, 0, 0]], jnp.int32)
DEC_IN = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), TARGETS[:, :-1]], axis=1)
MAX_NEW = TARGETS.shape[1]  # decoded rows have the teacher-forced batch's shape (one compiled forward)


@pytest.fixture(scope="module")
def params():
    model = EncoderDecoder(CONFIG)
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS, DEC_IN)["params"])


@functools.partial(jax.jit, static_argnames="config")
def _encode(params, config=CONFIG, tokens=TOKENS, tasks=TASKS):
    model = EncoderDecoder(config)
    return model.apply({"params": params}, tokens, task_index=tasks, method=model.encode)


@functools.partial(jax.jit, static_argnames="config")
def _logits(params, tokens, dec_in, tasks, config=CONFIG):
    return EncoderDecoder(config).apply({"params": params}, tokens, dec_in, task_index=tasks)


def _by_hand(params, row, task):
    """The row's encoder input built from Python lists: the prompt rows where the placement puts them."""
    tok = [int(t) for t in TOKENS[row]]
    valid = [t for t in tok if t]
    front, mid, back = PROMPT.counts()[task]
    cut = valid.index(3) + 1 if 3 in valid else len(valid)
    emb, table = params["token_embedder"]["embedding"], params["prompt"]["table"][task]
    ids = lambda xs: emb[jnp.asarray(xs, jnp.int32)]  # noqa: E731
    pieces = [table[:front], ids(valid[:cut]), table[front:front + mid], ids(valid[cut:]), table[front + mid:],
              ids([0] * (len(tok) - len(valid)))]
    x = jnp.concatenate([p for p in pieces if p.shape[0]], axis=0)
    return x, jnp.arange(len(tok) + N) < len(valid) + N


def test_encoder_input_matches_hand_built_rows(params):
    model = EncoderDecoder(CONFIG)
    got = _encode(params)
    rows = [_by_hand(params, row, task) for row, task in enumerate([0, 1, 2, 3])]
    x, valid = jnp.stack([r[0] for r in rows]), jnp.stack([r[1] for r in rows])
    want = jax.jit(lambda p: model.apply({"params": p}, TOKENS, input_embeddings=x, input_valid=valid,
                                         method=model.encode))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_variants_hide_what_they_say(params):
    """text_blind: text outputs do not depend on the prompt values; prompt_blind: prompt outputs
    do not depend on the text tokens (and the full mask depends on both)."""
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["prompt"] = {**params["prompt"], "table": params["prompt"]["table"] + 1.0}
    other_text = TOKENS.at[0, 1].set(40)
    front = jnp.zeros(4, jnp.int32)  # task 0: prompts at positions 0..N-1
    for mask, prompt_moves_text, text_moves_prompt in (("full", True, True), ("text_blind", False, True),
                                                        ("prompt_blind", True, False)):
        config = CONFIG.replace(prompt=PromptConfig(**{**PROMPT.to_dict(), "mask": mask}))
        base = _encode(params, config, tasks=front)
        by_prompt = _encode(changed, config, tasks=front)
        by_text = _encode(params, config, tokens=other_text, tasks=front)
        text_delta = float(jnp.max(jnp.abs(by_prompt[0, N:] - base[0, N:])))
        prompt_delta = float(jnp.max(jnp.abs(by_text[0, :N] - base[0, :N])))
        assert (text_delta > 1e-4) == prompt_moves_text, (mask, text_delta)
        assert (prompt_delta > 1e-4) == text_moves_prompt, (mask, prompt_delta)


def test_decoder_prompt_equals_the_backbone_fed_its_vectors_as_tokens(params):
    """A decoder prompt holding the embeddings of ids (a, b) gives the logits that the model
    without a decoder prompt gives for decoder input [a, b, <start>, y...] at the target
    positions: the prompt sits before the shifted targets, with causal masks and relative
    positions counted in the longer row. Another decoder prompt changes the logits."""
    emb = params["token_embedder"]["embedding"]
    ids = jnp.asarray([[11, 12], [13, 14], [15, 16], [17, 18]], jnp.int32)
    as_tokens = {**params, "prompt": {**params["prompt"], "decoder_table": emb[ids]}}
    got = _logits(as_tokens, TOKENS, DEC_IN, TASKS)
    backbone = {**params, "prompt": {"table": params["prompt"]["table"]}}
    fed = _logits(backbone, TOKENS, jnp.concatenate([ids[TASKS], DEC_IN], axis=1), TASKS, ENCODER_ONLY)
    assert got.shape == (4, MAX_NEW, 64)
    np.testing.assert_allclose(got, fed[:, M:], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(_logits(params, TOKENS, DEC_IN, TASKS) - got))) > 1e-3


def test_mixed_task_batch_equals_each_task_alone(params):
    """Outputs per row and the gradient of each prompt row (encoder and decoder tables) equal
    those of the task's example run alone (a batch of that example 4 times: one compiled
    step for both, the gradient 4 times the example's)."""
    def loss(prompt, rows):
        logits = _logits({**params, "prompt": prompt}, TOKENS[rows], DEC_IN[rows], TASKS[rows])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), TARGETS[rows][..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(TARGETS[rows] > 0, logp, 0.0)), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, mixed_logits), mixed_grad = grad(params["prompt"], jnp.arange(4))
    # float32 sums in another order (the batch changes the matmul blocking): 2e-5 of the scale.
    logit_tol = 2e-5 * float(jnp.max(jnp.abs(mixed_logits)))
    for row in range(4):
        (_, alone_logits), alone_grad = grad(params["prompt"], jnp.full(4, row))
        np.testing.assert_allclose(mixed_logits[row], alone_logits[0], rtol=0, atol=logit_tol)
        others = jnp.asarray([t for t in range(4) if t != row])
        for name in ("table", "decoder_table"):
            scale = float(jnp.max(jnp.abs(mixed_grad[name])))
            np.testing.assert_allclose(4 * mixed_grad[name][row], alone_grad[name][row], rtol=0, atol=8e-5 * scale)
            assert float(jnp.max(jnp.abs(alone_grad[name][row]))) > 0.0, name
            assert float(jnp.max(jnp.abs(alone_grad[name][others]))) == 0.0, name


def _teacher_forced(params, outputs, config):
    """Per row: the argmax of the teacher-forced logits of `outputs` [B, T] and the sum of the
    log-probabilities of its tokens up to its first EOS (all of them without one) - the
    score greedy and beam search report. (decoding.score drops every id 0 as padding, and an
    untrained model can emit id 0 before EOS, so it is not the reference here.)"""
    dec_in = jnp.concatenate([jnp.zeros((outputs.shape[0], 1), jnp.int32), outputs[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(_logits(params, TOKENS, dec_in, TASKS, config))
    lengths = np.asarray(decoding.output_lengths(outputs, decoding.EOS_ID))
    token_logp = np.asarray(jnp.take_along_axis(logp, outputs[..., None], -1)[..., 0])
    return np.asarray(jnp.argmax(logp, -1)), lengths, np.asarray(
        [token_logp[r, :n].sum() for r, n in enumerate(lengths)])


@pytest.mark.parametrize("decoder_prompt", [True, False], ids=["decoder_prompt", "encoder_prompt_only"])
def test_greedy_and_beam_with_prompts_equal_teacher_forcing(params, decoder_prompt):
    """Greedy (KV cache, the decoder prompt prefilled) equals the teacher-forced argmax; its
    scores (and with a decoder prompt the best beam's) equal the teacher-forced
    log-probabilities of their tokens; decoding.score counts the decoder prompt as training does."""
    config = CONFIG if decoder_prompt else ENCODER_ONLY
    new_tokens = MAX_NEW if decoder_prompt else MAX_NEW + M  # the forward pass of the test above
    if not decoder_prompt:
        params = {**params, "prompt": {"table": params["prompt"]["table"]}}
    out = decoding.greedy(params, TOKENS, config=config, max_new_tokens=new_tokens, task_index=TASKS)
    forced, _, forced_scores = _teacher_forced(params, out.tokens, config)
    for row in range(4):
        n = int(out.lengths[row])
        assert list(np.asarray(out.tokens[row, :n])) == list(forced[row, :n])
    np.testing.assert_allclose(out.scores, forced_scores, rtol=2e-5, atol=2e-5)
    if not decoder_prompt:
        return
    beam = decoding.beam_search(params, TOKENS, config=config, num_beams=2, max_new_tokens=MAX_NEW, length_penalty=0.0,
                                task_index=TASKS)
    _, _, beam_forced = _teacher_forced(params, beam.tokens[:, 0], config)
    np.testing.assert_allclose(beam.scores[:, 0], beam_forced, rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(beam.scores[:, 0]) >= np.asarray(out.scores) - 1e-4)
    # TARGETS hold no id 0 before their end, so score's padding mask and the forced sum agree.
    _, totals = decoding.score(params, TOKENS, TARGETS, config=config, task_index=TASKS)
    logp = jax.nn.log_softmax(_logits(params, TOKENS, DEC_IN, TASKS))
    want = jnp.sum(jnp.where(TARGETS > 0, jnp.take_along_axis(logp, TARGETS[..., None], -1)[..., 0], 0.0), -1)
    np.testing.assert_allclose(totals, want, rtol=1e-5, atol=1e-5)


def test_prompt_with_packed_inputs_is_refused(params):
    model = EncoderDecoder(CONFIG)
    with pytest.raises(ConfigError, match="prompt tuning needs unpacked inputs"):
        model.apply({"params": params}, TOKENS, DEC_IN, encoder_segment_ids=jnp.ones_like(TOKENS))


def test_moe_backbone_pads_the_prompted_length_for_the_balanced_router():
    config = get_config("cpm2_moe_tiny", vocab_size=64, prompt=PromptConfig(length=3, init="normal"),
                        num_encoder_layers=1, num_decoder_layers=1)
    assert padded_length(config, 8 + 3) == 12  # 4 experts: a multiple of 4
    model = EncoderDecoder(config)
    # Shapes only: traced, never compiled.
    params = nn.unbox(jax.eval_shape(functools.partial(model.init, method=model.encode), jax.random.PRNGKey(0),
                                     TOKENS)["params"])
    tasks = jnp.zeros(4, jnp.int32)
    encoded = jax.eval_shape(functools.partial(_encode, config=config), params, tasks=tasks)
    assert encoded.shape == (4, 12, config.d_model)
    # 4 tokens + 3 prompt vectors = 7 -> 8.
    shorter = jax.eval_shape(functools.partial(_encode, config=config), params,
                             tokens=TOKENS[:, :4].at[:, 3].set(0), tasks=tasks)
    assert shorter.shape == (4, 8, config.d_model)
