"""Where prompt vectors go in each encoder row, as pure functions of the tokens.

A row of L tokens (valid ones first, then 0-padding) with N prompt vectors becomes a row of
L + N positions. Anchors per row: front a_0 = 0, middle a_1 = (first `<sep>`) + 1, back
a_2 = number of valid tokens. With n_k vectors at anchor k (sum N) and prompt vector p in
group k(p) (vectors are taken in order: front ones first):

    position(prompt p) = a_k(p) + p
    position(token i)  = i + sum_k n_k [a_k <= i]

a bijection onto 0..L+N-1 because a_0 <= a_1 <= a_2. Every padded token lands after every
valid one and every prompt (pads sit at i >= a_2), so after insertion a row's valid
positions are exactly the first (valid tokens + N): the decoder's cross-attention mask
follows from the tokens alone (`valid_after_insert`). Relative positions are offsets in the
new row, so training, scoring and decoding see the same positions.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.errors import DataError
from cpm2_jax.prompts.config import PLACES, PromptConfig


def anchors(tokens: jax.Array, sep_id: int) -> jax.Array:
    """[B, L] tokens -> [B, 3] int32 anchors (front, middle, back). A row without `sep_id`
    gets its middle anchor at the back (the host check `check_batch` refuses such rows
    for placements that use the middle)."""
    valid_len = jnp.sum(tokens > 0, axis=-1).astype(jnp.int32)
    is_sep = jnp.logical_and(tokens == sep_id, tokens > 0)
    middle = jnp.where(jnp.any(is_sep, axis=-1), jnp.argmax(is_sep, axis=-1).astype(jnp.int32) + 1, valid_len)
    return jnp.stack([jnp.zeros_like(valid_len), jnp.minimum(middle, valid_len), valid_len], axis=-1)


def layout(tokens: jax.Array, counts: jax.Array, num_prompts: int, sep_id: int) -> tuple[jax.Array, jax.Array]:
    """Source index of every position of the L + N row: [B, L + N] int32, values < L are
    tokens, L + p is prompt vector p; and the boolean `is_prompt` [B, L + N]."""
    length = tokens.shape[1]
    counts = counts.astype(jnp.int32)
    a = anchors(tokens, sep_id)
    i = jnp.arange(length, dtype=jnp.int32)
    token_pos = i[None, :] + jnp.sum(counts[:, :, None] * (a[:, :, None] <= i[None, None, :]), axis=1)
    p = jnp.arange(num_prompts, dtype=jnp.int32)
    ends = jnp.cumsum(counts, axis=-1)  # group k holds p in [ends[k-1], ends[k])
    group = jnp.sum(p[None, None, :] >= ends[:, :2, None], axis=1)  # [B, N] in 0..2
    prompt_pos = jnp.take_along_axis(a, group, axis=-1) + p[None, :]
    dest = jnp.concatenate([token_pos, prompt_pos], axis=-1)  # [B, L + N], a permutation per row
    rows = jnp.arange(tokens.shape[0])[:, None]
    src = jnp.zeros_like(dest).at[rows, dest].set(jnp.arange(length + num_prompts, dtype=jnp.int32)[None, :])
    return src, src >= length


def insert(embedded: jax.Array, valid: jax.Array, prompt: jax.Array, src: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token embeddings [B, L, D] and prompt vectors [B, N, D] laid out by `src` (from `layout`):
    (inputs [B, L + N, D], validity [B, L + N]); prompt positions are always valid."""
    both = jnp.concatenate([embedded, prompt.astype(embedded.dtype)], axis=1)
    ok = jnp.concatenate([valid, jnp.ones(prompt.shape[:2], jnp.bool_)], axis=1)
    return jnp.take_along_axis(both, src[:, :, None], axis=1), jnp.take_along_axis(ok, src, axis=1)


def valid_after_insert(tokens: jax.Array, total_length: int, num_prompts: int) -> jax.Array:
    """[B, total_length] validity of a row after insertion (and any end padding): the first
    (valid tokens + N) positions, whatever the placement."""
    count = jnp.sum(tokens > 0, axis=-1, keepdims=True) + num_prompts
    return jnp.arange(total_length)[None, :] < count


def mask_variant(is_prompt: jax.Array, mask: str) -> Optional[jax.Array]:
    """The paper's encoder attention variants as a [B, 1, q, k] boolean to AND with the usual
    mask (None for 'full'): 'prompt_blind' - a prompt query attends to prompt keys only;
    'text_blind' - a text query attends to text keys only."""
    q, k = is_prompt[:, None, :, None], is_prompt[:, None, None, :]
    if mask == "full":
        return None
    if mask == "prompt_blind":
        return jnp.logical_or(jnp.logical_not(q), k)
    if mask == "text_blind":
        return jnp.logical_or(q, jnp.logical_not(k))
    raise ValueError(f"unknown prompt mask {mask!r}")


def check_batch(tokens: np.ndarray, task_index: Optional[np.ndarray], config: PromptConfig, where: str) -> None:
    """Host-side check of a batch before it is compiled against: every task index names a
    row of the prompt table, and every row whose task puts prompts in the middle has a
    `<sep>` among its tokens. Raises DataError naming `where`, the row and the task."""
    tokens = np.asarray(tokens)
    tasks = np.zeros(tokens.shape[0], np.int64) if task_index is None else np.asarray(task_index).reshape(-1)
    if tasks.shape[0] != tokens.shape[0]:
        raise DataError(f"{where}: task_index has {tasks.shape[0]} rows, the inputs {tokens.shape[0]}")
    bad = np.flatnonzero((tasks < 0) | (tasks >= config.num_tasks))
    if bad.size:
        raise DataError(f"{where}: row {int(bad[0])} has task index {int(tasks[bad[0]])}, but the prompt table has "
                        f"{config.num_tasks} task(s) (0..{config.num_tasks - 1})")
    counts = config.counts()
    specs = config.placements()
    for row, task in enumerate(tasks):
        needs_sep = counts[task][PLACES.index("middle")] > 0
        if needs_sep and (tokens[row] > 0).any() and not (tokens[row] == config.sep_id).any():
            raise DataError(f"{where}: row {row} (task {int(task)}, placement {specs[task]!r}) has no <sep> "
                            f"(id {config.sep_id}) to put its middle prompt after")
