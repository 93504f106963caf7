"""The encoder-decoder run layer by layer from the host, so an offload runner can act between
layers (move expert weights, schedule, cache) while everything else stays as `decoding.py` has it.

Each piece is one jitted function reused by every layer of its kind: a dense layer is the
model's own `EncoderLayer` / `DecoderLayer`; an MoE layer is one call for its attention part
(the same submodules), the MoE input and the routing (split_moe.route), then
`moe_rows(stack, index, routed, out, guess)` - the experts with the weights at hand, or a runner
streaming them; `guess`, with `lookahead`, the next MoE layer's router applied to this layer's
MoE input (the experts that layer will likely need: a runner's prefetch) - the combine and the
residual then done by the next piece. Relative-position bias, masks
and the KV cache are built as in `model.transformer` / `decoding.init_cache`.

An MoE layer's output is not combined by a call of its own: the experts' rows travel as a
`Pending` (x, rows, routing) that the next jitted piece combines first (the next layer, the
encoder's final norm, or the head). Per decoding step the host issues one call per MoE layer
before its experts (attention and routing, with the previous MoE layer's combine), one per
expert with tokens, one per dense layer and one for the head with decoding.py's greedy choice
and the next step's embedding and bias; it waits for the device once per MoE layer (the token
counts, which the schedule needs; a runner may wait for the experts' end too) and once for the
step's end flag past `min_new_tokens`. Fewer calls and waits are what a host-stepped decoder
costs: each is ~0.1 ms of dispatch on the CPU.

Greedy decoding is a host loop with decoding.py's per-step choice.
Beam search reuses `decoding.py`'s loop: under `jax.disable_jit()` its `lax.while_loop` runs
as a Python loop and each step re-enables jit for the layers, so the beam bookkeeping (scores,
finished beams, length penalty) is decoding.py's own, token for token (slow: its bookkeeping
then runs op by op).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cpm2_jax import decoding
from cpm2_jax.config import ModelConfig
from cpm2_jax.model.attention import RelativePositionBias, attention_mask, mask_to_bias
from cpm2_jax.model.dense import Embed, Projection
from cpm2_jax.model.norm import RMSNorm
from cpm2_jax.model.transformer import DecoderLayer, EncoderLayer, _Layer
from cpm2_jax.offload import split_moe

STACKS = ("encoder", "decoder")
# (stack, layer, routed tokens, zero output rows, guess) -> the experts' output rows
# (split_moe.RoutedTokens; guess: the next MoE layer's token counts per expert had its input been
# this layer's, [E], or None)
MoeRows = Callable[[str, int, split_moe.RoutedTokens, jax.Array, Optional[jax.Array]], jax.Array]


class _EncoderAttention(_Layer):
    """x + Attn(RMSNorm(x)): an encoder layer without its FFN (parameter names of EncoderLayer)."""

    @nn.compact
    def __call__(self, x, bias):
        h = self._norm("pre_attention_layer_norm")(x)
        return x + self._attention("attention")(h, h, bias)


class _DecoderAttention(_Layer):
    """Self- then cross-attention of a decoder layer (parameter and cache names of DecoderLayer)."""

    @nn.compact
    def __call__(self, x, encoded, self_bias, cross_bias, cache_index=None):
        h = self._norm("pre_self_attention_layer_norm")(x)
        x = x + self._attention("self_attention")(h, h, self_bias, cache_index)
        h = self._norm("pre_cross_attention_layer_norm")(x)
        return x + self._attention("encoder_decoder_attention", cross=True)(h, encoded, cross_bias)


class _MoeInput(_Layer):
    """What the MoE block reads: x itself (experts hold their norms) or Switch's shared pre-norm."""

    @nn.compact
    def __call__(self, x):
        return x if self.config.moe_expert_norm else self._norm("pre_mlp_layer_norm")(x)


@flax.struct.dataclass
class Pending:
    """An MoE layer's result before its combine: x + combine(rows, routed), computed inside
    whichever jitted piece reads it next (`resolve`), so the combine costs no call of its own."""

    x: jax.Array  # the layer's input to the MoE block's residual
    rows: jax.Array  # the experts' output rows (split_moe's sorted layout)
    routed: split_moe.RoutedTokens
    dtype: str = flax.struct.field(pytree_node=False)


def resolve(x):
    """A `Pending` -> x + the MoE block's output (y_s = sum_a w_a out_a); anything else as is.
    Traceable: called inside each jitted piece on its inputs."""
    if isinstance(x, Pending):
        return x.x + split_moe.combine(x.rows, x.routed, x.dtype).astype(x.x.dtype)
    return x


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, params, *args):
    return module.apply({"params": params}, *map(resolve, args))


class Static:
    """A static jit argument hashed once: jit hashes and compares its static arguments at every
    call, and a flax module's dataclass hash and equality walk every field of its config (~60
    us a decoding step's call on the CPU). The same holder each call: the cache lookup is its
    stored hash and an identity check; equal modules still share one compilation."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and (self.value is other.value or self.value == other.value)


@functools.partial(jax.jit, static_argnums=0)
def _apply_cached(module: Static, params, cache, *args):
    out, variables = module.value.apply({"params": params, "cache": cache}, *map(resolve, args), mutable=["cache"])
    return out, variables["cache"]


@functools.partial(jax.jit, static_argnums=0)
def _shape_cache(module: nn.Module, params, x, encoded):
    """A decoder layer's cache after the cache-shaping pass (decode=True, no cache yet): the
    self-attention's reset to zeros, the cross-attention's kept as the pass wrote them."""
    _, variables = module.apply({"params": params}, x, encoded, 0.0, 0.0, mutable=["cache"])
    cache = dict(variables["cache"])
    cache["self_attention"] = jax.tree.map(jnp.zeros_like, cache["self_attention"])
    return cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encoder_moe_in(attention: nn.Module, moe_input: nn.Module, params, next_router, x, bias):
    """An encoder MoE layer up to its experts: (x after attention, routed tokens, zero output
    rows, the next MoE layer's guessed counts or None)."""
    x = attention.apply({"params": params}, resolve(x), bias)
    return (x, *_route(moe_input, params, next_router, x))


@functools.partial(jax.jit, static_argnums=0)
def _decoder_moe_in(modules: Static, params, next_router, cache, x, *args):
    """A decoder MoE layer up to its experts: (x after attention, cache, routed tokens, zero rows,
    the next MoE layer's guessed counts or None). `modules`: (attention, MoE input)."""
    attention, moe_input = modules.value
    x, variables = attention.apply({"params": params, "cache": cache}, resolve(x), *args, mutable=["cache"])
    return (x, variables["cache"], *_route(moe_input, params, next_router, x))


def _route(moe_input: nn.Module, params, next_router, x):
    """(routed tokens, zero output rows, guess): `guess` is the next MoE layer's router
    (`next_router`, or None) applied to this layer's MoE input, its counts per expert - which
    experts that layer will likely need (in a trained model the residual stream changes little
    from one layer to the next; on the benchmark's random model the guess is right 30-45% of the
    time), known before this layer's experts run."""
    h = moe_input.apply({"params": params}, x)
    routed = split_moe.route(moe_input.config, params["moe"]["router"], h)
    guess = None if next_router is None else split_moe.route(moe_input.config, next_router, h).counts
    return routed, jnp.zeros(routed.rows.shape, jnp.float32), guess


def _layer_tree(stack_tree: dict, index: int, scanned: bool) -> dict:
    if scanned:
        return jax.tree.map(lambda a: a[index], stack_tree["layers"])
    return stack_tree[f"layers_{index}"]


class SteppedModel:
    """`EncoderDecoder` at inference, one jitted call per layer piece (see module docstring).

    `moe_rows` runs the MoE layers' experts; by default with every expert's weights taken from
    `params` (nothing offloaded). `lookahead`: each MoE layer also applies the next MoE layer's
    router (same stack) to its input, handed to `moe_rows` as `guess`. The non-expert weights
    stay as given.
    """

    def __init__(self, config: ModelConfig, params: dict, moe_rows: Optional[MoeRows] = None,
                 lookahead: bool = False):
        self.config = c = config
        params = nn.meta.unbox(params)
        self.params = params
        self.moe_rows = moe_rows or self.resident_moe_rows
        self.lookahead = lookahead
        scanned = c.scan_layers
        self.layers = {s: [_layer_tree(params[s], i, scanned) for i in range(self.num_layers(s))] for s in STACKS}
        kw = dict(config=c, deterministic=True)
        self._enc_layer = EncoderLayer(moe=False, **kw)
        self._dec_layer = DecoderLayer(moe=False, decode=True, **kw)
        self._enc_attention = _EncoderAttention(**kw)
        self._dec_attention = _DecoderAttention(decode=True, **kw)
        self._moe_input = _MoeInput(**kw)
        # a decoding step's static jit arguments, each hashed once (`Static`)
        self._static_dec_layer = Static(self._dec_layer)
        self._static_dec_moe = Static((self._dec_attention, self._moe_input))
        self._embed = Embed(num_embeddings=c.vocab_size, features=c.d_model, init_std=c.init_std, dtype=c.dtype,
                            param_dtype=c.param_dtype)
        self._norm = RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)
        self._relpos = {bi: RelativePositionBias(num_heads=c.num_heads, num_buckets=c.relative_attention_num_buckets,
                                                 max_distance=c.relative_attention_max_distance, bidirectional=bi,
                                                 init_std=c.init_std, param_dtype=c.param_dtype)
                        for bi in (True, False)}
        self._logits = Projection(features=(c.vocab_size,), kernel_axes=("embed", "vocab"), init_std=c.init_std,
                                  dtype=c.dtype, param_dtype=c.param_dtype)

    # ------------------------------------------------------------------ structure
    def num_layers(self, stack: str) -> int:
        return self.config.num_encoder_layers if stack == "encoder" else self.config.num_decoder_layers

    def is_moe(self, stack: str, index: int) -> bool:
        return self.config.is_moe_layer(stack, index)

    def moe_layers(self) -> list[tuple[str, int]]:
        """(stack, layer) of every MoE layer in the order a decoding step meets them."""
        return [(s, i) for s in STACKS for i in range(self.num_layers(s)) if self.is_moe(s, i)]

    def moe_params(self, stack: str, index: int) -> dict:
        return self.layers[stack][index]["moe"]

    def next_moe_layer(self, stack: str, index: int) -> Optional[int]:
        """The next MoE layer after `index` in the same stack (None after the stack's last)."""
        return next((i for i in range(index + 1, self.num_layers(stack)) if self.is_moe(stack, i)), None)

    def _next_router(self, stack: str, index: int) -> Optional[dict]:
        """The router `guess` applies: the next MoE layer's (same stack), with `lookahead`."""
        nxt = self.next_moe_layer(stack, index) if self.lookahead else None
        return None if nxt is None else self.moe_params(stack, nxt)["router"]

    def resident_moe_rows(self, stack: str, index: int, routed, out, guess=None) -> jax.Array:
        return split_moe.resident_rows(self.config, self.moe_params(stack, index), routed, out)

    def _experts(self, stack: str, index: int, x, routed, out, guess) -> Pending:
        return Pending(x, self.moe_rows(stack, index, routed, out, guess), routed, self.config.dtype)

    # ------------------------------------------------------------------ encoder
    def encode(self, encoder_input_tokens) -> jax.Array:
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        p = self.params
        x = _apply(self._embed, p["token_embedder"], tokens)
        valid = tokens > 0
        length = tokens.shape[1]
        bias = _encoder_bias(self._relpos[True], p["encoder"]["relpos_bias"], valid, length)
        for i, lp in enumerate(self.layers["encoder"]):
            if self.is_moe("encoder", i):
                x = self._experts("encoder", i, *_encoder_moe_in(self._enc_attention, self._moe_input, lp,
                                                                 self._next_router("encoder", i), x, bias))
            else:
                x = _apply(self._enc_layer, lp, x, bias)
        return _apply(self._norm, p["encoder"]["encoder_norm"], x)

    # ------------------------------------------------------------------ decoder
    def init_state(self, encoded, encoder_input_tokens, max_length: int) -> dict:
        """Decoding state: per-layer caches from the attention's cache-shaping pass (as
        decoding.init_cache: self-attention keys/values zero, cross-attention ones as that pass
        leaves them), the step index and the cross-attention bias."""
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        x = jnp.zeros((encoded.shape[0], max_length, self.config.d_model), encoded.dtype)
        layers = [_shape_cache(self._dec_attention, lp, x, encoded) for lp in self.layers["decoder"]]
        cross = mask_to_bias(attention_mask(None, tokens > 0))
        return {"layers": layers, "index": jnp.zeros((), jnp.int32), "encoded": encoded, "cross_bias": cross}

    def _step_input(self, tokens, index, max_length: int) -> tuple:
        p = self.params
        return _step_input(self._embed, self._relpos[False], max_length, p["token_embedder"],
                           p["decoder"]["relpos_bias"], jnp.asarray(tokens, jnp.int32), index)

    def _decoder(self, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """(tokens [n], state) -> (the last layer's output [n, 1, d] or its `Pending`, state): one
        decoder position."""
        x, self_bias = self._step_input(tokens, state["index"], _max_length(state))
        x, caches = self._layers(x, self_bias, state)
        return x, {**state, "layers": caches, "index": state["index"] + 1}

    def _layers(self, x, self_bias, state: dict) -> tuple:
        """The decoder layers on the step's embedded tokens at position state["index"]:
        (the last layer's output, the layers' caches)."""
        index, enc, cross = state["index"], state["encoded"], state["cross_bias"]
        caches = []
        for i, (lp, cache) in enumerate(zip(self.layers["decoder"], state["layers"])):
            if self.is_moe("decoder", i):
                x, cache, routed, out, guess = _decoder_moe_in(self._static_dec_moe, lp,
                                                               self._next_router("decoder", i), cache, x, enc,
                                                               self_bias, cross, index)
                x = self._experts("decoder", i, x, routed, out, guess)
            else:
                x, cache = _apply_cached(self._static_dec_layer, lp, cache, x, enc, self_bias, cross, index)
            caches.append(cache)
        return x, caches

    def _head_args(self) -> tuple:
        p, dec = self.params, self.params["decoder"]
        return (self.config, self._norm, self._logits, self._embed), (dec["decoder_norm"], dec.get("logits_dense"),
                                                                     p["token_embedder"])

    def step(self, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """(tokens [n], state) -> (float32 logits [n, vocab], state): one decoder position."""
        x, state = self._decoder(tokens, state)
        modules, params = self._head_args()
        return _head(*modules, *params, x), state

    # ------------------------------------------------------------------ decoding (decoding.py's loops)
    def greedy(self, encoder_input_tokens, *, max_new_tokens: int, min_new_tokens: int = 0,
               eos_id: int = decoding.EOS_ID) -> decoding.DecodeOutput:
        """decoding.greedy's result (tokens padded with 0 after EOS, summed log-probs, lengths),
        from a host loop: one jitted choice per step, stopping once every row has ended."""
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        batch = tokens.shape[0]
        state = self.init_state(self.encode(tokens), tokens, max_new_tokens)
        current = jnp.full((batch,), decoding.DECODER_START_ID, jnp.int32)
        done, score = jnp.zeros((batch,), jnp.bool_), jnp.zeros((batch,), jnp.float32)
        out = []
        modules, head = self._head_args()
        p, max_length = self.params, _max_length(state)
        statics = Static((*modules, min_new_tokens, eos_id, (self._relpos[False], max_length)))
        x, self_bias = self._step_input(current, state["index"], max_length)
        for i in range(max_new_tokens):
            y, caches = self._layers(x, self_bias, state)
            # the head, the choice and the next step's input in one call
            current, done, score, ended, x, self_bias, index = _head_choice(
                statics, *head, p["decoder"]["relpos_bias"], y, done, score, state["index"])
            state = {**state, "layers": caches, "index": index}
            out.append(current)
            if i >= min_new_tokens and bool(ended):  # no row ends before min_new_tokens: no wait until then
                break
        out += [jnp.zeros((batch,), jnp.int32)] * (max_new_tokens - len(out))
        result = jnp.stack(out, axis=1)
        return decoding.DecodeOutput(tokens=result, scores=score, lengths=decoding.output_lengths(result, eos_id))

    def beam_search(self, encoder_input_tokens, *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                    length_penalty_kind: str = "hf", early_stopping=False, min_new_tokens: int = 0,
                    eos_id: int = decoding.EOS_ID) -> decoding.DecodeOutput:
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        encoded = jnp.repeat(self.encode(tokens), num_beams, axis=0)
        beam_tokens = jnp.repeat(tokens, num_beams, axis=0)
        state = self.init_state(encoded, beam_tokens, max_new_tokens)
        with jax.disable_jit():
            return decoding.beam_loop(self._host_step, state, tokens.shape[0], num_beams=num_beams,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_id=eos_id,
                                      alpha=jnp.float32(length_penalty),
                                      penalty=decoding.LENGTH_PENALTIES[length_penalty_kind],
                                      early_stopping=early_stopping, scanned=False)

    def _host_step(self, tokens, state):
        """The step called from decoding.py's loop bodies (run eagerly): layers jitted again."""
        with jax.disable_jit(False):
            logits, state = self.step(tokens, state)
        return logits, state


@functools.partial(jax.jit, static_argnums=(4, 5))
def _greedy_choice(logits, done, score, i, min_new_tokens: int, eos_id: int):
    """decoding._sample_loop's greedy step: EOS forbidden before `min_new_tokens`, argmax, pad
    after a row's EOS, log-prob of the choice added to the row's score."""
    logits = decoding.forbid_token(logits, eos_id, i < min_new_tokens)
    chosen = jnp.where(done, decoding.PAD_ID, decoding.argmax(logits).astype(jnp.int32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), chosen[:, None], axis=-1)[:, 0]
    return chosen, jnp.logical_or(done, chosen == eos_id), score + jnp.where(done, 0.0, logp)


@functools.partial(jax.jit, static_argnums=0)
def _head_choice(statics: Static, norm_params, logits_params, embed_params, relpos_table, x, done, score, index):
    """The head, the greedy choice at step `index` and the next step's input, in one call:
    (chosen, done, score, every row done, next embeddings, next self-attention bias, index + 1).
    `statics`: (config, norm, logits, embed, min_new_tokens, eos_id, (the decoder's
    relative-position module, the cache length))."""
    config, norm, logits, embed, min_new_tokens, eos_id, step_modules = statics.value
    out = _head(config, norm, logits, embed, norm_params, logits_params, embed_params, x)
    chosen, done, score = _greedy_choice(out, done, score, index, min_new_tokens, eos_id)
    relpos, max_length = step_modules
    nxt, bias = _step_input(embed, relpos, max_length, embed_params, relpos_table, chosen, index + 1)
    return chosen, done, score, done.all(), nxt, bias, index + 1


def _max_length(state: dict) -> int:
    return state["layers"][0]["self_attention"]["cached_key"].shape[1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step_input(embed: nn.Module, relpos: nn.Module, max_length: int, embed_params, table, tokens, index):
    """The step's token embeddings [n, 1, d] and self-attention bias (one call)."""
    x = embed.apply({"params": embed_params}, tokens[:, None])
    return x, _step_bias(relpos, table, index, max_length)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encoder_bias(relpos: nn.Module, table: dict, valid: jax.Array, length: int) -> jax.Array:
    bias = relpos.apply({"params": table}, length, length)
    return bias + mask_to_bias(attention_mask(valid, valid))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _step_bias(relpos: nn.Module, table: dict, index: jax.Array, max_length: int) -> jax.Array:
    """The new query at position `index` sees keys 0..index (model.transformer.Decoder)."""
    k_pos = jnp.arange(max_length)
    return relpos.apply({"params": table}, 1, max_length, q_offset=index) + mask_to_bias(
        (k_pos <= index)[None, None, None, :])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _head(config: ModelConfig, norm: nn.Module, logits: nn.Module, embed: nn.Module, norm_params, logits_params,
          embed_params, x):
    """decoder_norm, then the output matrix (or the tied embedding), as model.transformer.Decoder."""
    x = norm.apply({"params": norm_params}, resolve(x))
    if config.tie_word_embeddings:
        out = embed.apply({"params": embed_params}, x * config.d_model ** -0.5, method=embed.attend)
    else:
        out = logits.apply({"params": logits_params}, x)
    return out[:, 0].astype(jnp.float32)
