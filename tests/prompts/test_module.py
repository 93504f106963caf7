"""The prompt inside the model: encoder input against a hand-built one, mask variants by what
they hide, decoding against teacher forcing, a mixed-task batch against each task alone."""
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

N = 4
PLACEMENTS = ("front", "middle", "back", "front:1+middle:1+back:2")
PROMPT = PromptConfig(length=N, num_tasks=len(PLACEMENTS), placement=PLACEMENTS, init="normal")
# Large init so logits vary (greedy and beam choices are not ties).
CONFIG = get_config("tiny", vocab_size=64, init_std=0.3, prompt=PROMPT)
TOKENS = jnp.asarray([[5, 6, 3, 7, 8, 1, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0],
                      [4, 11, 3, 12, 13, 14, 15, 1], [20, 21, 3, 22, 1, 0, 0, 0]], jnp.int32)
TASKS = jnp.asarray([0, 1, 2, 3], jnp.int32)


@pytest.fixture(scope="module")
def params():
    model = EncoderDecoder(CONFIG)
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS, jnp.ones((4, 3), jnp.int32))["params"])


@functools.partial(jax.jit, static_argnames="config")
def _encode(params, config=CONFIG, tokens=TOKENS, tasks=TASKS):
    model = EncoderDecoder(config)
    return model.apply({"params": params}, tokens, task_index=tasks, method=model.encode)


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
    hand = jax.jit(lambda p, t, x, v: model.apply({"params": p}, t, input_embeddings=x, input_valid=v,
                                                   method=model.encode))
    for row, task in enumerate([0, 1, 2, 3]):
        x, valid = _by_hand(params, row, task)
        want = hand(params, TOKENS[row:row + 1], x[None], valid[None])
        np.testing.assert_allclose(got[row], want[0], rtol=1e-5, atol=1e-5)


def test_mask_variants_hide_what_they_say(params):
    """text_blind: text outputs do not depend on the prompt values; prompt_blind: prompt outputs
    do not depend on the text tokens (and the full mask depends on both)."""
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["prompt"] = {"table": params["prompt"]["table"] + 1.0}
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


def test_mixed_task_batch_equals_each_task_alone(params):
    """Outputs per row and the gradient of each prompt row equal those of the task's rows run alone."""
    model = EncoderDecoder(CONFIG)
    dec_in = jnp.asarray([[0, 7, 8], [0, 9, 1], [0, 5, 5], [0, 6, 2]], jnp.int32)
    targets = jnp.asarray([[7, 8, 1], [9, 1, 0], [5, 5, 1], [6, 2, 1]], jnp.int32)

    def loss(table, rows):
        p = {**params, "prompt": {"table": table}}
        logits = model.apply({"params": p}, TOKENS[rows], dec_in[rows], task_index=TASKS[rows])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[rows][..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(targets[rows] > 0, logp, 0.0)), logits

    table = params["prompt"]["table"]
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, mixed_logits), mixed_grad = grad(table, jnp.arange(4))
    # float32 sums in another order (the batch changes the matmul blocking): 2e-5 of the scale.
    logit_tol, grad_tol = 2e-5 * float(jnp.max(jnp.abs(mixed_logits))), 2e-5 * float(jnp.max(jnp.abs(mixed_grad)))
    for row in range(4):
        (_, alone_logits), alone_grad = grad(table, jnp.asarray([row]))
        np.testing.assert_allclose(mixed_logits[row], alone_logits[0], rtol=0, atol=logit_tol)
        np.testing.assert_allclose(mixed_grad[row], alone_grad[row], rtol=0, atol=grad_tol)
        others = [t for t in range(4) if t != row]
        assert float(jnp.max(jnp.abs(alone_grad[jnp.asarray(others)]))) == 0.0


def test_greedy_and_beam_with_prompts_equal_teacher_forcing(params):
    out = decoding.greedy(params, TOKENS, config=CONFIG, max_new_tokens=5, task_index=TASKS)
    dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), out.tokens[:, :-1]], axis=1)
    logits = jax.jit(EncoderDecoder(CONFIG).apply)({"params": params}, TOKENS, dec_in, task_index=TASKS)
    forced = np.asarray(jnp.argmax(logits, -1))
    for row in range(4):
        n = int(out.lengths[row])
        assert list(np.asarray(out.tokens[row, :n])) == list(forced[row, :n])
    _, totals = decoding.score(params, TOKENS, out.tokens, config=CONFIG, task_index=TASKS)
    np.testing.assert_allclose(totals, out.scores, atol=1e-4)
    beam = decoding.beam_search(params, TOKENS, config=CONFIG, num_beams=2, max_new_tokens=5, length_penalty=0.0,
                                task_index=TASKS)
    _, beam_totals = decoding.score(params, TOKENS, beam.tokens[:, 0], config=CONFIG, task_index=TASKS)
    np.testing.assert_allclose(beam_totals, beam.scores[:, 0], atol=1e-4)
    assert np.all(np.asarray(beam.scores[:, 0]) >= np.asarray(out.scores) - 1e-4)


def test_prompt_with_packed_inputs_is_refused(params):
    model = EncoderDecoder(CONFIG)
    with pytest.raises(ConfigError, match="prompt tuning needs unpacked inputs"):
        model.apply({"params": params}, TOKENS, jnp.ones((4, 3), jnp.int32), encoder_segment_ids=jnp.ones_like(TOKENS))


def test_moe_backbone_pads_the_prompted_length_for_the_balanced_router():
    config = get_config("cpm2_moe_tiny", vocab_size=64, prompt=PromptConfig(length=3, init="normal"),
                        num_encoder_layers=1, num_decoder_layers=1)
    assert padded_length(config, 8 + 3) == 12  # 4 experts: a multiple of 4
    model = EncoderDecoder(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS, jnp.ones((4, 3), jnp.int32))["params"])
    encoded = _encode(params, config, tasks=jnp.zeros(4, jnp.int32))
    assert encoded.shape == (4, 12, config.d_model)
    # 4 tokens + 3 prompt vectors = 7 -> 8.
    shorter = _encode(params, config, tokens=TOKENS[:, :4].at[:, 3].set(0), tasks=jnp.zeros(4, jnp.int32))
    assert shorter.shape == (4, 8, config.d_model)
