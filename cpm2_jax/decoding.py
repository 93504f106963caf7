"""KV-cached decoding of the CPM-2 encoder-decoder: greedy, sampling, beam search, scoring.

Every decoder below is one jitted program: the encoder runs once, the decoder cache is
allocated at its final size, and a single `jax.lax.while_loop` feeds one token per step
through `EncoderDecoder.decode(..., decode=True)` until every row has emitted EOS or
`max_new_tokens` are written. Conventions are mT5's: decoder start token 0, EOS 1, pad 0
(written after a row's EOS).

Beam search follows `transformers`' vectorised beam search (also the structure of t5x's):
2k candidates per step from the accumulated log-probabilities of the k live beams; the best
k that did not just end stay alive; candidates among the top k that ended (EOS, or the
length limit) compete for k finished slots with score sum(log p) / lp(length). Two length
penalties: `"hf"` lp(n) = n**alpha (transformers' `length_penalty`) and `"t5x"` (GNMT's
brevity penalty, t5x's default) lp(n) = ((5 + n) / 6)**alpha. They agree at alpha = 0.
`early_stopping` takes transformers' values (True, False, "never"); "never" with alpha = 0
is closest to t5x's loop. Two differences from t5x remain: t5x lets every candidate of the
2k that ended with EOS compete for the finished slots (transformers: only those in the top
k), and t5x returns a beam cut off by the length limit only when no beam finished with EOS
(transformers, and this module, let it compete with the finished ones, length-penalised).
Output layout differs from
`generate` only after EOS: rows here are always `max_new_tokens` long and padded with 0
(transformers crops to the longest row and pads beam outputs with EOS).

Sampling applies transformers' warpers in its order (temperature, top-k, top-p); the draws
come from a JAX PRNG key, so they are reproducible per key but not equal to torch's.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import ModelConfig, dtype_of
from cpm2_jax.errors import check_choice
from cpm2_jax.model.dense import DECODE_WEIGHTS
from cpm2_jax.model.transformer import EncoderDecoder, reorder_cache

PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0
# Beam bookkeeping adds this to scores that must lose (transformers' constant, so float32
# arithmetic and the resulting orderings are the same).
BEAM_NEG = -1.0e9

StepFn = Callable[[jax.Array, dict], tuple[jax.Array, dict]]


@flax.struct.dataclass
class DecodeOutput:
    """tokens: [batch, max_new_tokens] (beam search: [batch, beams, max_new_tokens]), pad 0 after EOS;
    scores: per row (per beam) sum of model log-probs (beam search: the length-penalised score);
    lengths: generated tokens per row, EOS included."""

    tokens: jax.Array
    scores: jax.Array
    lengths: jax.Array


# ---------------------------------------------------------------------------------------------
# Logit filters (pure functions)
# ---------------------------------------------------------------------------------------------

def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Sets every logit below the k-th largest of its row to -inf (ties with it are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keeps the most likely tokens whose probabilities before them (in
    descending order) sum to less than p, i.e. the smallest set reaching mass p; never empty."""
    if p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def argmax(logits: jax.Array) -> jax.Array:
    """First index of the row maximum (as `jnp.argmax`), as two plain reductions: XLA:CPU runs
    the variadic (value, index) reduce behind `jnp.argmax` ~5-9x slower over a 52k vocabulary."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, ids, logits.shape[-1]), axis=-1)


def forbid_token(logits: jax.Array, token: int, when: jax.Array) -> jax.Array:
    """`logits[..., token] = -inf` where `when` (a scalar or per-row bool): min-length EOS masking."""
    col = jnp.arange(logits.shape[-1]) == token
    return jnp.where(jnp.logical_and(when, col), -jnp.inf, logits)


def hf_length_penalty(length, alpha: float):
    """transformers' normaliser: length ** alpha."""
    return jnp.asarray(length, jnp.float32) ** alpha


def t5x_length_penalty(length, alpha: float):
    """GNMT's brevity penalty, used by t5x: ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


LENGTH_PENALTIES = {"hf": hf_length_penalty, "t5x": t5x_length_penalty}


# ---------------------------------------------------------------------------------------------
# Model plumbing: encoder once, cache, one-token step
# ---------------------------------------------------------------------------------------------

def _model(config: ModelConfig) -> EncoderDecoder:
    return EncoderDecoder(config)


def _encode(config: ModelConfig, params, encoder_input_tokens, task_index=None):
    """Encoder states; `task_index` [B] picks each row's prompt (models with a prompt table)."""
    model = _model(config)
    return model.apply({"params": params}, encoder_input_tokens, task_index=task_index, method=model.encode)


def init_cache(config: ModelConfig, params, encoded, encoder_input_tokens, length: int, task_index=None):
    """The decoder cache for `length` positions, shaped without running the decoder: the
    cross-attention keys/values of `encoded` projected once (`fill_cross_attention_cache`),
    every other value (self-attention keys/values, index) zero.

    The cache-shaping pass of `EncoderDecoder.decode(decode=True)` is evaluated abstractly
    (`jax.eval_shape`). With a decoder prompt (`PromptConfig.decoder_length` M) the cache holds
    M + `length` positions and the rows' prompts (`task_index`) fill the first M
    (`EncoderDecoder.prefill_decoder_prompt`): the steps then start at position M.
    """
    model = _model(config)
    batch = encoded.shape[0]

    def shape_pass(p, enc, tok):
        _, variables = model.apply({"params": p}, enc, tok, jnp.zeros((batch, length), jnp.int32), decode=True,
                                   method=model.decode, mutable=["cache"])
        return variables["cache"]

    shapes = jax.eval_shape(shape_pass, params, encoded, encoder_input_tokens)
    cache = fill_cross_attention_cache(config, params, encoded,
                                       jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    if config.prompt is None or not config.prompt.decoder_length:
        return cache
    _, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_input_tokens, task_index,
                               method=model.prefill_decoder_prompt, mutable=["cache"])
    return variables["cache"]


def fill_cross_attention_cache(config: ModelConfig, params, encoded, cache):
    """`cache` with every cross-attention layer's `cached_key`/`cached_value` set to the
    encoder states projected by that layer's key/value kernels ([batch, enc_len, heads, dim];
    scanned layers stacked first), as `MultiHeadAttention` projects them: the steps only read them."""
    params = nn.meta.unbox(params)["decoder"]
    dtype = dtype_of(config.dtype)
    x = encoded.astype(dtype)

    def fill(path, value):
        names = [getattr(k, "key", None) for k in path]
        if "encoder_decoder_attention" not in names or names[-1] not in ("cached_key", "cached_value"):
            return value
        layer = params
        for name in names[1:names.index("encoder_decoder_attention") + 1]:
            layer = layer[name]
        kernel = layer["key" if names[-1] == "cached_key" else "value"]["kernel"].astype(dtype)
        spec = "bld,ndhk->nblhk" if kernel.ndim == 4 else "bld,dhk->blhk"
        return jnp.einsum(spec, x, kernel).astype(value.dtype)

    return jax.tree_util.tree_map_with_path(fill, cache)


def decode_weights(config: ModelConfig, params) -> dict:
    """A decoding step's kernels laid out for batch-1 steps (collection `DECODE_WEIGHTS`): per
    decoder layer the self-attention query/key/value kernels as one [embed, 3, heads, kv]
    array ("qkv"), a dense gated FFN's wi_0/wi_1 as one [embed, 2, mlp] array ("wi") and its
    wo transposed, [embed, mlp] ("wo_t"); scanned layers keep their leading `layers` axis.
    Built outside the step loop (once per decoding call, or once per model with
    `prepare_decode_weights`): a batch-1 step then reads each layer's input-side weights in 2
    matrix-vector products instead of 5 (XLA:CPU runs each as its own call), and wo as 512
    rows of d_ff, which XLA:CPU's matrix-vector product reads ~20% faster than d_ff rows of
    512 (`small`, 2 CPU cores); the same sums per output."""
    axis = 2 if config.scan_layers else 1  # after [layers,] embed
    out = {}
    for name, layer in nn.meta.unbox(params)["decoder"].items():
        if not name.startswith("layers"):
            continue
        attn = layer["self_attention"]
        entry = {"self_attention": {"qkv": jnp.stack([attn[k]["kernel"] for k in ("query", "key", "value")],
                                                      axis=axis)}}
        mlp = layer.get("mlp", {})
        if "wi_0" in mlp and "wi_1" in mlp:
            entry["mlp"] = {"wi": jnp.stack([mlp["wi_0"], mlp["wi_1"]], axis=axis),
                            "wo_t": jnp.swapaxes(mlp["wo"], -1, -2)}
        out[name] = entry
    return {"decoder": out}


def cross_attention_layouts(config: ModelConfig, cache) -> dict:
    """The encoder keys/values of `cache` (filled by `init_cache`) laid out per head for a
    decoding step (collection `DECODE_WEIGHTS`): "key_t" [batch, heads, dim, enc_len] and
    "value_t" [batch, heads, enc_len, dim] per decoder layer (scanned: [layers, ...]). The
    same numbers, transposed once per decoding call: a step's cross-attention is then one
    matrix-vector product per head and product (`attention.transposed_cache_attention`)."""
    lead = 1 if config.scan_layers else 0
    key_axes = tuple(range(lead)) + tuple(lead + a for a in (0, 2, 3, 1))
    value_axes = tuple(range(lead)) + tuple(lead + a for a in (0, 2, 1, 3))
    out = {}
    for name, layer in cache["decoder"].items():
        cross = layer.get("encoder_decoder_attention") if hasattr(layer, "get") else None
        if cross is not None:
            out[name] = {"encoder_decoder_attention": {"key_t": jnp.transpose(cross["cached_key"], key_axes),
                                                       "value_t": jnp.transpose(cross["cached_value"], value_axes)}}
    return {"decoder": out}


def stacks_weights() -> bool:
    """Whether decoding steps read `decode_weights` by default: on CPU (see `decode_weights`)."""
    return jax.default_backend() == "cpu"


def prepare_decode_weights(params, *, config: ModelConfig) -> Optional[dict]:
    """`decode_weights` built once for a model that decodes many batches (`cpm2 infer`, eval),
    to pass as `weights=` to `greedy`, `sample`, `beam_search` or `decode`: a decoding call
    then skips stacking them (a copy of about 2/3 of the decoder layers, ~0.5 of 8 ms per step of a
    64-token greedy call of the `small` model on 2 CPU cores) and the copy lives as long as
    the caller keeps it. Steps read the same numbers either way. None where steps read the
    parameters as they are (off CPU)."""
    return jax.jit(decode_weights, static_argnums=0)(config, nn.meta.unbox(params)) if stacks_weights() else None


def make_step(config: ModelConfig, params, encoded, encoder_input_tokens, *,
              stack_weights: Optional[bool] = None, cache=None, weights: Optional[dict] = None) -> StepFn:
    """(tokens [n], cache) -> (float32 logits [n, vocab], cache) for one decoder position.

    `stack_weights` (default: on CPU) runs the steps with `decode_weights`: `weights` when
    given (`prepare_decode_weights`), else built here once, a copy of the decoder's qkv and
    wi_0/wi_1 and wo kernels (about 2/3 of a dense decoder layer) that lives as long as the step
    function; given the filled `cache`, also with its encoder keys/values per head
    (`cross_attention_layouts`, a copy of the cross-attention cache).
    """
    model = _model(config)
    if stack_weights is None:
        stack_weights = stacks_weights()
    variables = {"params": params}
    if stack_weights:
        layers = (decode_weights(config, params) if weights is None else weights)["decoder"]
        variables[DECODE_WEIGHTS] = {"decoder": dict(layers)}  # the caller's `weights` stay as they are
        if cache is not None:
            layouts = cross_attention_layouts(config, cache)["decoder"]
            stacked = variables[DECODE_WEIGHTS]["decoder"]
            for name, entry in layouts.items():
                stacked[name] = {**stacked.get(name, {}), **entry}

    def step(tokens, cache):
        logits, variables_out = model.apply({**variables, "cache": cache}, encoded, encoder_input_tokens,
                                            tokens[:, None], decode=True, method=model.decode, mutable=["cache"])
        return logits[:, 0].astype(jnp.float32), variables_out["cache"]

    return step


def _prepare(params, encoder_input_tokens):
    return nn.meta.unbox(params), jnp.asarray(encoder_input_tokens, jnp.int32)


def output_lengths(tokens: jax.Array, eos_id: int) -> jax.Array:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    is_eos = tokens == eos_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


def strip_after_eos(ids, eos_id: int = EOS_ID) -> list[int]:
    """One row of generated ids (host) before its first EOS: the output a user sees. The one
    host-side EOS rule (infer's outputs; `output_lengths` is the same rule on device)."""
    ids = [int(t) for t in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


# ---------------------------------------------------------------------------------------------
# Greedy and sampling: one loop, argmax or a draw
# ---------------------------------------------------------------------------------------------

def _sample_loop(step: StepFn, cache, batch: int, *, max_new_tokens: int, min_new_tokens: int, eos_id: int,
                 choose: Callable[[jax.Array, jax.Array], jax.Array], rng: jax.Array,
                 needs_rng: bool = True) -> DecodeOutput:
    """Decodes `batch` rows until all emit EOS; `choose(logits, key)` picks each step's tokens.

    Column 0 of the token buffer is the decoder start token; the step at position i reads
    column i and writes column i + 1. Rows that ended keep writing pad.
    """
    tokens = jnp.full((batch, max_new_tokens + 1), PAD_ID, jnp.int32).at[:, 0].set(DECODER_START_ID)
    init = (jnp.zeros((), jnp.int32), tokens, cache, jnp.zeros((batch,), jnp.bool_),
            jnp.zeros((batch,), jnp.float32), rng)

    def cond(state):
        i, _, _, done, _, _ = state
        return jnp.logical_and(i < max_new_tokens, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, tokens, cache, done, score, rng = state
        current = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)[:, 0]
        logits, cache = step(current, cache)
        logits = forbid_token(logits, eos_id, i < min_new_tokens)
        if needs_rng:  # greedy skips the per-step key split (threefry is dozens of ops on CPU)
            rng, key = jax.random.split(rng)
        else:
            key = rng
        chosen = choose(logits, key).astype(jnp.int32)
        chosen = jnp.where(done, PAD_ID, chosen)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), chosen[:, None], axis=-1)[:, 0]
        score = score + jnp.where(done, 0.0, logp)
        done = jnp.logical_or(done, chosen == eos_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], i + 1, axis=1)
        return i + 1, tokens, cache, done, score, rng

    _, tokens, _, _, score, _ = jax.lax.while_loop(cond, body, init)
    out = tokens[:, 1:]
    return DecodeOutput(tokens=out, scores=score, lengths=output_lengths(out, eos_id))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "min_new_tokens", "eos_id",
                                             "temperature", "top_k", "top_p"))
def _sample_jit(params, encoder_input_tokens, rng, task_index=None, weights=None, *, config: ModelConfig,
                max_new_tokens: int, min_new_tokens: int, eos_id: int, temperature: float, top_k: int, top_p: float) -> DecodeOutput:
    encoded = _encode(config, params, encoder_input_tokens, task_index)
    cache = init_cache(config, params, encoded, encoder_input_tokens, max_new_tokens, task_index)
    step = make_step(config, params, encoded, encoder_input_tokens, cache=cache, weights=weights)

    if temperature == 0.0:
        def choose(logits, key):
            del key
            return argmax(logits)
    else:
        def choose(logits, key):
            # transformers' order of warpers: temperature, then top-k, then top-p.
            filtered = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
            return jax.random.categorical(key, filtered, axis=-1)

    return _sample_loop(step, cache, encoder_input_tokens.shape[0], max_new_tokens=max_new_tokens,
                        min_new_tokens=min_new_tokens, eos_id=eos_id, choose=choose, rng=rng,
                        needs_rng=temperature != 0.0)


def greedy(params, encoder_input_tokens, *, config: ModelConfig, max_new_tokens: int, min_new_tokens: int = 0,
           eos_id: int = EOS_ID, task_index=None, weights: Optional[dict] = None) -> DecodeOutput:
    """Greedy decoding (argmax each step) of a [batch, length] 0-padded encoder batch
    (`task_index` [batch]: each row's prompt, for models with a prompt table; `weights`:
    `prepare_decode_weights(params)`, for a model that decodes many batches)."""
    params, tokens = _prepare(params, encoder_input_tokens)
    return _sample_jit(params, tokens, jax.random.PRNGKey(0), task_index, weights, config=config,
                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_id=eos_id, temperature=0.0, top_k=0, top_p=1.0)


def sample(params, encoder_input_tokens, rng: jax.Array, *, config: ModelConfig, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
           eos_id: int = EOS_ID, task_index=None, weights: Optional[dict] = None) -> DecodeOutput:
    """Ancestral sampling from softmax(logits / temperature), optionally top-k and/or nucleus
    (top-p) filtered; the same `rng` gives the same tokens. temperature 0 is greedy."""
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    params, tokens = _prepare(params, encoder_input_tokens)
    return _sample_jit(params, tokens, rng, task_index, weights, config=config, max_new_tokens=max_new_tokens,
                       min_new_tokens=min_new_tokens, eos_id=eos_id, temperature=float(temperature),
                       top_k=int(top_k), top_p=float(top_p))


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------

def _gather(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x[b, indices[b, j], ...] for [batch, n, ...] x and [batch, m] indices."""
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def beam_loop(step: StepFn, cache, batch: int, *, num_beams: int, max_new_tokens: int, min_new_tokens: int,
              eos_id: int, alpha: jax.Array, penalty: Callable, early_stopping: Union[bool, str],
              scanned: bool) -> DecodeOutput:
    """Beam search over `batch` rows whose cache rows are laid out [batch * num_beams] (row-major);
    `step` is any StepFn (offload.stepped drives it with a host-side step)."""
    k, n_cand = num_beams, 2 * num_beams
    seqs = jnp.full((batch, k, max_new_tokens + 1), PAD_ID, jnp.int32).at[:, :, 0].set(DECODER_START_ID)
    alive_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(BEAM_NEG)  # only beam 0 starts live
    fin_scores = jnp.full((batch, k), BEAM_NEG, jnp.float32)
    fin_flags = jnp.zeros((batch, k), jnp.bool_)
    improvable = jnp.ones((batch,), jnp.bool_)  # transformers' is_early_stop_heuristic_unsatisfied
    in_top_k = jnp.arange(n_cand) < k
    init = (jnp.zeros((), jnp.int32), seqs, alive_scores, seqs, fin_scores, fin_flags, improvable,
            jnp.ones((), jnp.bool_), cache)

    def cond(state):
        i, go = state[0], state[7]
        return jnp.logical_and(i < max_new_tokens, go)

    def body(state):
        i, seqs, alive_scores, fin_seqs, fin_scores, fin_flags, improvable, _, cache = state
        current = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=2).reshape(batch * k)
        logits, cache = step(current, cache)
        logp = forbid_token(jax.nn.log_softmax(logits, axis=-1), eos_id, i < min_new_tokens)
        vocab = logp.shape[-1]
        total = (logp.reshape(batch, k, vocab) + alive_scores[:, :, None]).reshape(batch, k * vocab)

        # 2k best continuations over all beams.
        cand_scores, flat = jax.lax.top_k(total, n_cand)
        cand_beam, cand_token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(_gather(seqs, cand_beam), cand_token[:, :, None], i + 1,
                                                        axis=2)
        ended = jnp.logical_or(cand_token == eos_id, i + 1 >= max_new_tokens)

        # The k best candidates that go on.
        live = cand_scores + ended.astype(jnp.float32) * BEAM_NEG
        keep = jax.lax.top_k(live, k)[1]
        new_seqs, new_alive = _gather(cand_seqs, keep), _gather(live, keep)
        source = _gather(cand_beam, keep) + (jnp.arange(batch) * k)[:, None]

        # Candidates among the top k that ended compete for the finished slots.
        just_ended = jnp.logical_and(ended, in_top_k[None, :])
        full = jnp.logical_and(jnp.all(fin_flags, axis=-1, keepdims=True), early_stopping is True)
        normed = cand_scores / penalty(i + 1, alpha)
        normed = normed + full.astype(jnp.float32) * BEAM_NEG
        normed = normed + jnp.logical_not(improvable)[:, None].astype(jnp.float32) * BEAM_NEG
        normed = normed + jnp.logical_not(just_ended).astype(jnp.float32) * BEAM_NEG
        merged_scores = jnp.concatenate([fin_scores, normed], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        fin_seqs = _gather(jnp.concatenate([fin_seqs, cand_seqs], axis=1), best)
        fin_scores = _gather(merged_scores, best)
        fin_flags = _gather(jnp.concatenate([fin_flags, just_ended], axis=1), best)

        cache = reorder_cache(cache, source.reshape(-1), scanned=scanned)

        # Can a live beam still beat the worst finished one? (transformers' heuristic)
        best_len = i + 1
        if early_stopping == "never":  # a positive alpha favours the longest possible hypothesis
            best_len = jnp.where(alpha > 0.0, max_new_tokens, best_len)
        best_possible = new_alive[:, 0] / penalty(best_len, alpha)
        worst_finished = jnp.where(fin_flags, jnp.min(fin_scores, axis=-1, keepdims=True), BEAM_NEG)
        improvable = jnp.logical_and(improvable, jnp.any(best_possible[:, None] > worst_finished, axis=-1))
        go = jnp.any(improvable)
        if early_stopping is True:
            go = jnp.logical_and(go, jnp.logical_not(jnp.all(fin_flags)))
        go = jnp.logical_and(go, jnp.logical_not(jnp.all(ended)))
        return i + 1, new_seqs, new_alive, fin_seqs, fin_scores, fin_flags, improvable, go, cache

    state = jax.lax.while_loop(cond, body, init)
    fin_seqs, fin_scores = state[3], state[4]
    out = fin_seqs[:, :, 1:]
    return DecodeOutput(tokens=out, scores=fin_scores, lengths=output_lengths(out, eos_id))


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_new_tokens", "min_new_tokens", "eos_id",
                                             "length_penalty_kind", "early_stopping"))
def _beam_jit(params, encoder_input_tokens, task_index=None, weights=None, *, config: ModelConfig, num_beams: int,
              max_new_tokens: int, min_new_tokens: int, eos_id: int, alpha: jax.Array, length_penalty_kind: str,
              early_stopping: Union[bool, str]) -> DecodeOutput:
    batch = encoder_input_tokens.shape[0]
    encoded = _encode(config, params, encoder_input_tokens, task_index)  # once per input, not per beam
    encoded = jnp.repeat(encoded, num_beams, axis=0)
    beam_tokens = jnp.repeat(encoder_input_tokens, num_beams, axis=0)
    beam_tasks = None if task_index is None else jnp.repeat(jnp.asarray(task_index, jnp.int32).reshape(batch),
                                                               num_beams, axis=0)
    cache = init_cache(config, params, encoded, beam_tokens, max_new_tokens, beam_tasks)
    step = make_step(config, params, encoded, beam_tokens, cache=cache, weights=weights)
    return beam_loop(step, cache, batch, num_beams=num_beams, max_new_tokens=max_new_tokens,
                     min_new_tokens=min_new_tokens, eos_id=eos_id, alpha=alpha,
                     penalty=LENGTH_PENALTIES[length_penalty_kind], early_stopping=early_stopping,
                     scanned=config.scan_layers)


def beam_search(params, encoder_input_tokens, *, config: ModelConfig, num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, length_penalty_kind: str = "hf",
                early_stopping: Union[bool, str] = False, min_new_tokens: int = 0,
                eos_id: int = EOS_ID, task_index=None, weights: Optional[dict] = None) -> DecodeOutput:
    """Beam search; tokens [batch, num_beams, max_new_tokens] best first, scores the
    length-penalised log-probabilities (defaults are transformers' `generate` defaults)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    check_choice("length_penalty_kind", length_penalty_kind, sorted(LENGTH_PENALTIES), ValueError)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    params, tokens = _prepare(params, encoder_input_tokens)
    return _beam_jit(params, tokens, task_index, weights, config=config, num_beams=int(num_beams),
                     max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens), eos_id=int(eos_id), alpha=jnp.float32(length_penalty),
                     length_penalty_kind=length_penalty_kind, early_stopping=early_stopping)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config",))
def _score_jit(params, encoder_input_tokens, targets, task_index=None, *, config: ModelConfig):
    model = _model(config)
    decoder_inputs = jnp.concatenate(
        [jnp.full(targets.shape[:1] + (1,), DECODER_START_ID, jnp.int32), targets[:, :-1]], axis=1)
    logits = model.apply({"params": params}, encoder_input_tokens, decoder_inputs,
                         task_index=task_index).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, :, None], axis=-1)[:, :, 0]
    logp = jnp.where(targets != PAD_ID, logp, 0.0)
    return logp, jnp.sum(logp, axis=-1)


def score(params, encoder_input_tokens, targets, *, config: ModelConfig, task_index=None
          ) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log-likelihood of 0-padded `targets` [batch, T] (EOS included if wanted):
    (per-token log-probs [batch, T], 0 at padding; their sum per row [batch])."""
    params, tokens = _prepare(params, encoder_input_tokens)
    return _score_jit(params, tokens, jnp.asarray(targets, jnp.int32), task_index, config=config)


# ---------------------------------------------------------------------------------------------
# One entry point by name (the infer binary)
# ---------------------------------------------------------------------------------------------

METHODS = ("greedy", "beam", "sample")


def decode(params, encoder_input_tokens, *, config: ModelConfig, method: str = "greedy", max_new_tokens: int,
           min_new_tokens: int = 0, num_beams: int = 4, length_penalty: float = 1.0,
           length_penalty_kind: str = "hf", early_stopping: Union[bool, str] = False, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, rng: Optional[jax.Array] = None, task_index=None,
           weights: Optional[dict] = None) -> DecodeOutput:
    """`greedy`, `beam` or `sample` by name; beam search returns only its best beam here, so
    every method gives tokens [batch, max_new_tokens] and scores [batch]."""
    if method == "greedy":
        return greedy(params, encoder_input_tokens, config=config, max_new_tokens=max_new_tokens,
                      min_new_tokens=min_new_tokens, task_index=task_index, weights=weights)
    if method == "sample":
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return sample(params, encoder_input_tokens, rng, config=config, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens,
                      task_index=task_index, weights=weights)
    if method == "beam":
        out = beam_search(params, encoder_input_tokens, config=config, num_beams=num_beams,
                          max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                          length_penalty_kind=length_penalty_kind, early_stopping=early_stopping,
                          min_new_tokens=min_new_tokens, task_index=task_index, weights=weights)
        return DecodeOutput(tokens=out.tokens[:, 0], scores=out.scores[:, 0], lengths=out.lengths[:, 0])
    raise ValueError(f"unknown decoding method {method!r}; known: {', '.join(METHODS)}")
