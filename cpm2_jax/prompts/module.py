"""The prompt table and its insertion into the encoder input (held by `EncoderDecoder`).

One float32 table [num_tasks, N, d_model] (path `prompt/table`): each example takes the row
of its `task_index`, so one batch serves many tuned tasks over one frozen backbone. The
table stays float32 whatever the backbone's `param_dtype` (a bfloat16 frozen backbone with a
float32 trainable prompt); it is cast to the compute dtype where it joins the embeddings.
With `PromptConfig.decoder_length` > 0 a second table [num_tasks, M, d_model]
(`prompt/decoder_table`) holds the decoder prompts, selected by the same `task_index`.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError
from cpm2_jax.model.dense import normal_init
from cpm2_jax.prompts import placement

TABLE_AXES = (None, None, "embed")  # replicated: N x d_model per task is tiny


class PromptTable(nn.Module):
    """[num_tasks, N, d_model] float32 prompt vectors; `__call__(task_index [B])` -> [B, N, d_model]
    (`side="decoder"`: the decoder prompt rows [B, M, d_model] of `decoder_table`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, task_index: jax.Array, side: str = "encoder") -> jax.Array:
        c, p = self.config, self.config.prompt
        init = nn.with_logical_partitioning(normal_init(c.init_std), TABLE_AXES)
        # "table" is created first, so its initial values do not depend on a decoder prompt.
        tables = {"encoder": self.param("table", init, (p.num_tasks, p.length, c.d_model), jnp.float32)}
        if p.decoder_length:
            tables["decoder"] = self.param("decoder_table", init, (p.num_tasks, p.decoder_length, c.d_model),
                                           jnp.float32)
        if side not in tables:
            raise ConfigError(f"the prompt has no {side} table (PromptConfig.decoder_length = {p.decoder_length})")
        # Out-of-range indices are refused on the host (placement.check_batch); clip in-graph.
        return jnp.take(tables[side], jnp.clip(task_index, 0, p.num_tasks - 1), axis=0)


def padded_length(config: ModelConfig, length: int) -> int:
    """Encoder length with the prompt added, padded (with invalid positions) for the balanced
    MoE router: it gives every expert exactly S / E tokens of a routing group, and a group is
    `moe_group_size` tokens when that divides batch x length, else one sequence; padding the
    length to a multiple of lcm(E, group size) keeps both forms exact."""
    if not (config.is_moe and config.moe_router == "balanced"):
        return length
    step = math.lcm(config.num_experts, max(config.moe_group_size, 1))
    return -(-length // step) * step


def prompted_inputs(config: ModelConfig, embedded: jax.Array, tokens: jax.Array, prompt: jax.Array,
                    task_index: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Token embeddings [B, L, D] + each row's prompt [B, N, D] -> (encoder inputs [B, L', D],
    validity [B, L'], extra attention mask [B, 1, L', L'] or None), L' = L + N (+ MoE padding)."""
    p = config.prompt
    counts = jnp.take(jnp.asarray(p.counts(), jnp.int32), jnp.clip(task_index, 0, p.num_tasks - 1), axis=0)
    src, is_prompt = placement.layout(tokens, counts, p.length, p.sep_id)
    x, valid = placement.insert(embedded, tokens > 0, prompt, src)
    pad = padded_length(config, x.shape[1]) - x.shape[1]
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
        is_prompt = jnp.pad(is_prompt, ((0, 0), (0, pad)))
    return x, valid, placement.mask_variant(is_prompt, p.mask)


def default_task_index(tokens: jax.Array, task_index: Optional[jax.Array]) -> jax.Array:
    """The batch's task indices, task 0 for every row when none are given."""
    if task_index is None:
        return jnp.zeros(tokens.shape[:1], jnp.int32)
    return jnp.asarray(task_index, jnp.int32).reshape(tokens.shape[:1])


def refuse_packing(segment_ids) -> None:
    if segment_ids is not None:
        raise ConfigError("prompt tuning needs unpacked inputs (one example per row, DatasetConfig.pack = False): "
                          "a prompt is placed per row")
