"""Encoder, decoder and the encoder-decoder model (mT5 / T5 v1.1 layout, CPM2_FACTS "Dense model").

Every layer is pre-norm: x + Attn(RMSNorm(x)), x + FFN(RMSNorm(x)); each stack ends with a
final RMSNorm. One token embedding is shared by both stacks; the output projection
(`logits_dense`) is a separate matrix applied without a d_model**-0.5 rescale (or, with
`tie_word_embeddings`, the embedding itself after that rescale, as T5 v1.0 / Switch).

Extension points kept for the techniques built on this model:
- prompt tuning (`cpm2_jax.prompts`): with `ModelConfig.prompt` set, `encode` inserts each
  row's prompt (table row `task_index`) after the embedding, `decode` derives the longer
  encoder mask, and the Encoder takes an extra attention mask (the paper's mask variants);
  `encode` also takes `input_embeddings`/`input_valid` directly; a decoder prompt
  (`PromptConfig.decoder_length`) is the Decoder's `prefix`: prepended to the embedded decoder
  inputs, its logits dropped, its keys/values written into the KV cache once
  (`prefill_decoder_prompt`) before the decoding steps;
- knowledge inheritance: `__call__` is a pure function of (params, batch), callable for a
  teacher inside the student's train step;
- MoE / InfMoE: the feed-forward block is chosen in `_feed_forward` (dense `MlpBlock` or
  `cpm2_jax.moe.layer.MoeBlock`), and the expert arithmetic is `feedforward.gated_gelu`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError, closest
from cpm2_jax.model.attention import (MultiHeadAttention, RelativePositionBias, attention_mask,
                                      mask_to_bias)
from cpm2_jax.model.dense import DECODE_WEIGHTS, Embed, Projection
from cpm2_jax.model.feedforward import MlpBlock
from cpm2_jax.model.norm import RMSNorm

# Rematerialisation policies by name (ModelConfig.remat_policy). "full" recomputes the whole
# layer in the backward pass; "dots" keeps matmul outputs and recomputes the rest.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# Collections whose per-layer entries are stacked along the scanned `layers` axis.
_SCANNED_COLLECTIONS = ("params", "cache", "intermediates", "aux_loss", DECODE_WEIGHTS)


class _Layer(nn.Module):
    """Shared pieces of the encoder and decoder layers."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False
    scanned: bool = False  # under nn.scan a layer returns (carry, None)
    moe: bool = False  # this layer's FFN is the MoE block (ModelConfig.is_moe_layer)

    def _norm(self, name):
        return RMSNorm(epsilon=self.config.layer_norm_epsilon, dtype=self.config.dtype,
                       param_dtype=self.config.param_dtype, name=name)

    def _attention(self, name, cross=False):
        c = self.config
        return MultiHeadAttention(num_heads=c.num_heads, head_dim=c.head_dim, dropout_rate=c.dropout_rate,
                                  init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype,
                                  deterministic=self.deterministic, decode=self.decode,
                                  is_cross_attention=cross, cpu_weight_grads=c.cpu_weight_grads,
                                  recompute=c.attention_recompute, name=name)

    def _dropout(self, x):
        return nn.Dropout(self.config.dropout_rate)(x, deterministic=self.deterministic)

    def _feed_forward(self, x):
        """x + FFN(x): the dense pre-norm block, or the MoE block (its experts hold their norms,
        or with moe_expert_norm=False one shared pre-norm comes first, as in Switch)."""
        c = self.config
        if self.moe:
            from cpm2_jax.moe.layer import MoeBlock  # the MoE package builds on this module

            h = x if c.moe_expert_norm else self._norm("pre_mlp_layer_norm")(x)
            y = MoeBlock(config=c, deterministic=self.deterministic, name="moe")(h)
        else:
            y = self._norm("pre_mlp_layer_norm")(x)
            y = MlpBlock(d_ff=c.d_ff, activation=c.ffn_activation, dropout_rate=c.dropout_rate, init_std=c.init_std,
                         dtype=c.dtype, param_dtype=c.param_dtype, deterministic=self.deterministic,
                         cpu_weight_grads=c.cpu_weight_grads, name="mlp")(y)
        return x + self._dropout(y)

    def _out(self, x):
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class EncoderLayer(_Layer):
    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array):
        h = self._norm("pre_attention_layer_norm")(x)
        x = x + self._dropout(self._attention("attention")(h, h, bias))
        return self._out(self._feed_forward(x))


class DecoderLayer(_Layer):
    @nn.compact
    def __call__(self, x: jax.Array, encoded: jax.Array, self_bias: jax.Array, cross_bias: jax.Array,
                 cache_index: Optional[jax.Array] = None):
        h = self._norm("pre_self_attention_layer_norm")(x)
        x = x + self._dropout(self._attention("self_attention")(h, h, self_bias, cache_index))
        h = self._norm("pre_cross_attention_layer_norm")(x)
        x = x + self._dropout(self._attention("encoder_decoder_attention", cross=True)(h, encoded, cross_bias))
        return self._out(self._feed_forward(x))


def _stack_layers(module: nn.Module, layer_cls, num_layers: int, x, *args, deterministic: bool, decode: bool = False):
    """Runs `num_layers` layers: a Python loop (`layers_0`, `layers_1`, ...) or one nn.scan
    (`layers`, parameters stacked on a leading `layers` axis), with the configured remat."""
    c = module.config
    if c.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat_policy {c.remat_policy!r}{closest(c.remat_policy, REMAT_POLICIES)}; "
                          f"known: {', '.join(REMAT_POLICIES)}")
    cls = layer_cls
    if c.remat_policy != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
    kwargs = dict(config=c, deterministic=deterministic, decode=decode)
    stack = "encoder" if issubclass(layer_cls, EncoderLayer) else "decoder"
    if c.scan_layers:  # ModelConfig ensures every scanned layer is alike (all MoE or none)
        scan = nn.scan(cls, variable_axes={k: 0 for k in _SCANNED_COLLECTIONS},
                       split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                       length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scan(scanned=True, moe=c.is_moe_layer(stack, 0), name="layers", parent=module, **kwargs)(x, *args)
        return x
    for i in range(num_layers):
        x = cls(name=f"layers_{i}", parent=module, moe=c.is_moe_layer(stack, i), **kwargs)(x, *args)
    return x


class Encoder(nn.Module):
    """Token embedding -> dropout -> N encoder layers -> final RMSNorm -> dropout."""

    config: ModelConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None, *, enable_dropout: bool = False,
                 input_embeddings: Optional[jax.Array] = None, input_valid: Optional[jax.Array] = None,
                 attention_mask_extra: Optional[jax.Array] = None):
        """`attention_mask_extra`: a boolean [B, 1|heads, L, L] AND-ed with the padding/segment mask."""
        c = self.config
        deterministic = not enable_dropout
        x = self.shared_embedding(tokens) if input_embeddings is None else input_embeddings
        valid = (tokens > 0) if input_valid is None else input_valid
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        length = x.shape[1]
        bias = RelativePositionBias(num_heads=c.num_heads, num_buckets=c.relative_attention_num_buckets,
                                    max_distance=c.relative_attention_max_distance, bidirectional=True,
                                    init_std=c.init_std, param_dtype=c.param_dtype, name="relpos_bias")(length, length)
        mask = attention_mask(valid, valid, q_segment=segment_ids, k_segment=segment_ids)
        if attention_mask_extra is not None:
            mask = jnp.logical_and(mask, attention_mask_extra)
        bias = bias + mask_to_bias(mask)
        x = _stack_layers(self, EncoderLayer, c.num_encoder_layers, x, bias, deterministic=deterministic)
        x = RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name="encoder_norm")(x)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """Embedding -> N decoder layers (causal self-attention, cross-attention, FFN) -> norm -> logits."""

    config: ModelConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: jax.Array, encoder_valid: jax.Array, decoder_input_tokens: jax.Array,
                 encoder_segment_ids: Optional[jax.Array] = None, decoder_segment_ids: Optional[jax.Array] = None,
                 *, enable_dropout: bool = False, decode: bool = False, prefix: Optional[jax.Array] = None):
        """`prefix` [B, M, D] (a decoder prompt): vectors before the embedded tokens, attended
        causally like them; logits are returned for the tokens only. In a decoding step the
        new positions (prefix, then tokens) sit at `cache_index`.. and see every cached key
        before them: the prompt is passed once, alone, to fill the cache."""
        c = self.config
        deterministic = not enable_dropout
        x = self.shared_embedding(decoder_input_tokens)
        num_prefix = 0 if prefix is None else prefix.shape[1]
        if num_prefix:
            if decoder_segment_ids is not None:
                raise ConfigError("a decoder prompt needs unpacked targets (one example per row, DatasetConfig.pack = False)")
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        relpos = RelativePositionBias(num_heads=c.num_heads, num_buckets=c.relative_attention_num_buckets,
                                      max_distance=c.relative_attention_max_distance, bidirectional=False,
                                      init_std=c.init_std, param_dtype=c.param_dtype, name="relpos_bias")
        length = x.shape[1]
        cache_index = None
        if decode and self.has_variable("cache", "cache_index"):
            # A step of `length` new positions (1 per token; M to fill a decoder prompt): query q
            # sits at position cache_index + q and sees keys 0..cache_index + q.
            index_var = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            cache_index = index_var.value
            max_length = self.get_max_decode_length()
            q_pos = cache_index + jnp.arange(length)
            self_bias = relpos(length, max_length, q_offset=cache_index) + mask_to_bias(
                (jnp.arange(max_length)[None, :] <= q_pos[:, None])[None, None])
            index_var.value = cache_index + length
        else:
            if decode:  # cache-shaping pass: remember the decode length
                self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
                self.variable("cache", "max_length", lambda: jnp.zeros((length,), jnp.bool_))
            all_valid = jnp.ones(x.shape[:2], jnp.bool_)
            self_bias = relpos(length, length) + mask_to_bias(attention_mask(
                all_valid, all_valid, causal=True, q_segment=decoder_segment_ids, k_segment=decoder_segment_ids))
        cross_mask = attention_mask(None, encoder_valid, q_segment=decoder_segment_ids, k_segment=encoder_segment_ids)
        cross_bias = mask_to_bias(cross_mask)
        x = _stack_layers(self, DecoderLayer, c.num_decoder_layers, x, encoded, self_bias, cross_bias, cache_index,
                          deterministic=deterministic, decode=decode)
        x = x[:, num_prefix:]  # the prompt positions predict nothing
        x = RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name="decoder_norm")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        if c.tie_word_embeddings:
            logits = self.shared_embedding.attend(x * c.d_model ** -0.5)
        else:
            logits = Projection(features=(c.vocab_size,), kernel_axes=("embed", "vocab"), init_std=c.init_std,
                                dtype=c.dtype, param_dtype=c.param_dtype, cpu_weight_grads=c.cpu_weight_grads,
                                name="logits_dense")(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def get_max_decode_length(self) -> int:
        return self.get_variable("cache", "max_length").shape[0]


class EncoderDecoder(nn.Module):
    """CPM-2: `__call__` gives decoder logits [batch, target_length, vocab] (t5x's signature)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.token_embedder = Embed(num_embeddings=c.vocab_size, features=c.d_model, init_std=c.init_std,
                                    dtype=c.dtype, param_dtype=c.param_dtype)
        self.encoder = Encoder(config=c, shared_embedding=self.token_embedder)
        self.decoder = Decoder(config=c, shared_embedding=self.token_embedder)
        if c.prompt is not None:
            from cpm2_jax.prompts.module import PromptTable  # the prompts package builds on this module

            self.prompt = PromptTable(config=c)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, *, enable_dropout: bool = False,
               input_embeddings=None, input_valid=None, task_index=None):
        """Encoder states [B, L, D]; with a prompt [B, L + N (+ MoE padding), D], each row's
        prompt (`task_index`, task 0 when None) placed as its task's placement says."""
        if self.config.prompt is not None and input_embeddings is None:
            from cpm2_jax.prompts import module as prompt_module

            prompt_module.refuse_packing(encoder_segment_ids)
            task_index = prompt_module.default_task_index(encoder_input_tokens, task_index)
            x, valid, extra = prompt_module.prompted_inputs(
                self.config, self.token_embedder(encoder_input_tokens), encoder_input_tokens,
                self.prompt(task_index), task_index)
            return self.encoder(encoder_input_tokens, None, enable_dropout=enable_dropout, input_embeddings=x,
                                input_valid=valid, attention_mask_extra=extra)
        return self.encoder(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout,
                            input_embeddings=input_embeddings, input_valid=input_valid)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, *, enable_dropout: bool = False, decode: bool = False,
               encoder_valid=None, task_index=None):
        """Decoder logits. With a decoder prompt (`task_index` picks each row's) the prompt is
        prepended in training, scoring and the cache-shaping pass (the cache then holds M more
        positions); a decoding step adds no prompt (its keys/values are cached)."""
        if encoder_valid is None and self.config.prompt is not None:
            from cpm2_jax.prompts.placement import valid_after_insert

            encoder_valid = valid_after_insert(encoder_input_tokens, encoded.shape[1], self.config.prompt.length)
        valid = (encoder_input_tokens > 0) if encoder_valid is None else encoder_valid
        prefix = None
        if self._decoder_prompted() and not (decode and self.decoder.has_variable("cache", "cache_index")):
            prefix = self._decoder_prompt(decoder_input_tokens, task_index)
        return self.decoder(encoded, valid, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids,
                            enable_dropout=enable_dropout, decode=decode, prefix=prefix)

    def prefill_decoder_prompt(self, encoded, encoder_input_tokens, task_index=None, *, encoder_valid=None):
        """Writes each row's decoder prompt into the decoding cache (positions 0..M-1, cache
        index M), as the teacher-forced pass sees it: call with `mutable=["cache"]` on a cache
        from the cache-shaping pass, before the first step."""
        if encoder_valid is None:
            from cpm2_jax.prompts.placement import valid_after_insert

            encoder_valid = valid_after_insert(encoder_input_tokens, encoded.shape[1], self.config.prompt.length)
        empty = jnp.zeros((encoded.shape[0], 0), jnp.int32)
        return self.decoder(encoded, encoder_valid, empty, decode=True,
                            prefix=self._decoder_prompt(empty, task_index))

    def _decoder_prompted(self) -> bool:
        return self.config.prompt is not None and self.config.prompt.decoder_length > 0

    def _decoder_prompt(self, decoder_input_tokens, task_index):
        from cpm2_jax.prompts.module import default_task_index

        return self.prompt(default_task_index(decoder_input_tokens, task_index), side="decoder")

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, task_index=None, *, enable_dropout: bool = False, decode: bool = False):
        # decoder_target_tokens and *_positions are accepted for t5x compatibility: masking
        # comes from the encoder padding, the causal mask and the packed segment ids, and
        # relative positions are offsets within the (packed) row, as in t5x's T5.
        del decoder_target_tokens, encoder_positions, decoder_positions
        # `task_index` [B]: each row's prompt (models with a prompt table; ignored otherwise).
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout,
                              task_index=task_index)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                           decoder_segment_ids, enable_dropout=enable_dropout, decode=decode, task_index=task_index)


def reorder_cache(cache, batch_indices: jax.Array, *, scanned: bool):
    """Gathers rows `batch_indices` of every per-example cache array (beam search).

    Per-layer caches are [batch, ...] (or [layers, batch, ...] when scanned); scalars such
    as `cache_index`, `filled` and the `max_length` marker are shared and left alone.
    """
    def gather(path, x):
        name = getattr(path[-1], "key", None)
        if name not in ("cached_key", "cached_value"):
            return x
        return jnp.take(x, batch_indices, axis=1 if scanned else 0)

    return jax.tree_util.tree_map_with_path(gather, cache)
