"""Prompt placement against a brute-force list construction, mask variants against hand-built masks."""
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.errors import ConfigError, DataError
from cpm2_jax.prompts import PromptConfig, placement
from cpm2_jax.prompts.config import parse_placement

SEP = 3
ROWS = [[5, 6, 3, 7, 8, 1, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4, 4, 1]]


def reference_row(tokens, counts, n):
    """The row built by hand: 'P<p>' for prompt vector p, the token otherwise (pads at the end)."""
    valid = [t for t in tokens if t > 0]
    pads = [t for t in tokens if t == 0]
    middle = valid.index(SEP) + 1 if SEP in valid else len(valid)
    front, mid, back = counts
    prompts = [f"P{p}" for p in range(n)]
    return (prompts[:front] + valid[:middle] + prompts[front:front + mid] + valid[middle:]
            + prompts[front + mid:] + pads)


@pytest.mark.parametrize("spec", ["front", "middle", "back", "front+middle+back", "front:1+back:3",
                                  "middle:2+back:1"])
def test_layout_matches_brute_force(spec):
    n = 5
    counts = parse_placement(spec, n)
    assert sum(counts) == n
    tokens = jnp.asarray(ROWS[:2], jnp.int32)  # both rows have a <sep>
    src, is_prompt = placement.layout(tokens, jnp.asarray([counts] * 2), n, SEP)
    for row, tok in enumerate(ROWS[:2]):
        got = [f"P{int(s) - 8}" if s >= 8 else tok[int(s)] for s in np.asarray(src[row])]
        assert got == reference_row(tok, counts, n)
        assert list(np.asarray(is_prompt[row])) == [isinstance(g, str) for g in got]


def test_insert_puts_vectors_and_validity_where_expected():
    tokens = jnp.asarray(ROWS[:1], jnp.int32)
    counts = jnp.asarray([[1, 1, 2]])
    src, _ = placement.layout(tokens, counts, 4, SEP)
    embedded = jnp.asarray(ROWS[:1], jnp.float32)[:, :, None] * jnp.ones((1, 1, 2))
    prompt = -jnp.arange(1, 5, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 1, 2))
    x, valid = placement.insert(embedded, tokens > 0, prompt, src)
    assert list(np.asarray(x[0, :, 0])) == [-1, 5, 6, 3, -2, 7, 8, 1, -3, -4, 0, 0]
    assert list(np.asarray(valid[0])) == [True] * 10 + [False] * 2
    # The decoder's view of the same row: the first valid tokens + N positions.
    assert np.array_equal(placement.valid_after_insert(tokens, 12, 4), valid)


def test_parse_placement_ratio_split_is_exact():
    assert parse_placement("front", 100) == (100, 0, 0)
    assert parse_placement("front+middle+back", 100) == (34, 33, 33)
    assert parse_placement("front:1+middle:2+back:1", 10) == (3, 5, 2)
    with pytest.raises(ConfigError, match="unknown place 'midle'.*did you mean 'middle'"):
        parse_placement("front+midle", 10)
    with pytest.raises(ConfigError, match="ratio of 'back' must be > 0"):
        parse_placement("back:0", 10)


def test_mask_variants_against_hand_built_masks():
    is_prompt = jnp.asarray([[True, False, False, True]])
    p = [True, False, False, True]
    prompt_blind = [[(not p[q]) or p[k] for k in range(4)] for q in range(4)]
    text_blind = [[p[q] or (not p[k]) for k in range(4)] for q in range(4)]
    assert placement.mask_variant(is_prompt, "full") is None
    assert np.array_equal(np.asarray(placement.mask_variant(is_prompt, "prompt_blind"))[0, 0], prompt_blind)
    assert np.array_equal(np.asarray(placement.mask_variant(is_prompt, "text_blind"))[0, 0], text_blind)


def test_check_batch_names_row_and_task():
    config = PromptConfig(length=4, num_tasks=2, placement=("front", "middle"))
    tokens = np.asarray(ROWS, np.int32)
    placement.check_batch(tokens, np.asarray([0, 1, 0]), config, "batch")  # row 2 has no <sep>, task 0 is front
    with pytest.raises(DataError, match=r"batch: row 2 \(task 1, placement 'middle'\) has no <sep> \(id 3\)"):
        placement.check_batch(tokens, np.asarray([0, 1, 1]), config, "batch")
    with pytest.raises(DataError, match=r"batch: row 1 has task index 5, but the prompt table has 2 task\(s\)"):
        placement.check_batch(tokens, np.asarray([0, 5, 0]), config, "batch")
