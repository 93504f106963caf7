"""extend-vocab: every old row at its piece's new id, new rows from their longest prefix."""
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.convert.extend_vocab import KEPT, PREFIX, RANDOM, extend_params, plan_extension
from cpm2_jax.errors import ConfigError
from cpm2_jax.tasks.vocabulary import WordPieceVocabulary

SPECIALS = ["<pad>", "</s>", "<unk>", "<sep>"]


def _params(rows, d=3):
    """Embedding row i and output column i hold i (and i + 0.5): moves are readable."""
    embedding = np.repeat(np.arange(rows, dtype=np.float32)[:, None], d, axis=1)
    return {"token_embedder": {"embedding": embedding},
            "decoder": {"logits_dense": {"kernel": embedding.T + 0.5},
                        "decoder_norm": {"scale": np.ones(d, np.float32)}}}


def test_released_chinese_to_bilingual_keeps_every_row_at_its_new_id(shared_data):
    zh = WordPieceVocabulary.from_vocab_txt(shared_data / "cpm2_vocab" / "zh_vocab.txt")
    bi = WordPieceVocabulary.from_vocab_txt(shared_data / "cpm2_vocab" / "bilingual_vocab.txt")
    old, new = zh.pieces(), bi.pieces()
    plan = plan_extension(old, new, zh.extra_ids, bi.extra_ids, new_rows=bi.vocab_size)
    params, config = extend_params(_params(zh.vocab_size), get_config("tiny").replace(vocab_size=zh.vocab_size), plan)
    embedding = params["token_embedder"]["embedding"][:, 0]
    output = params["decoder"]["logits_dense"]["kernel"][0]
    assert config.vocab_size == bi.vocab_size and embedding.shape == (bi.vocab_size,)
    new_id = {}
    for j, piece in enumerate(new[4:len(new) - bi.extra_ids], 4):  # ids 0-3 stay by convention
        new_id.setdefault(piece, j)
    moved = 0
    for i, piece in enumerate(old[:len(old) - zh.extra_ids]):
        j = new_id[piece] if i >= 4 else i
        assert embedding[j] == i and output[j] == i + 0.5, piece
        moved += i != j
    assert moved > 20000  # the released files keep only a few ids in place
    for k in range(min(zh.extra_ids, bi.extra_ids)):  # sentinel k -> sentinel k at the new end
        assert embedding[bi.sentinel_id(k)] == zh.sentinel_id(k)
    counts = plan.counts()
    assert counts["kept"] == len(old) - zh.extra_ids + min(zh.extra_ids, bi.extra_ids)
    assert counts["prefix"] > 0 and sum(counts.values()) == bi.vocab_size
    # Every new piece's source is its longest prefix among the old pieces, when it has one.
    zh_index = {p: i for i, p in enumerate(old[4:len(old) - zh.extra_ids], 4)}
    for j in np.nonzero(plan.how == PREFIX)[0][:500]:
        piece, source = new[j], old[plan.source[j]]
        assert piece.startswith(source) and len(source) < len(piece)
        assert not any(piece[:e] in zh_index for e in range(len(source) + 1, len(piece)))


def test_longest_prefix_and_random_rows():
    old = SPECIALS + ["ab", "abc", "x"] + ["<extra_id_1>", "<extra_id_0>"]
    new = SPECIALS + ["x", "abc", "ab", "abcde", "zzz", "abx"] + ["<extra_id_2>", "<extra_id_1>", "<extra_id_0>"]
    plan = plan_extension(old, new, 2, 3, new_rows=len(new) + 2, seed=3)
    src = plan.source
    assert list(src[:7]) == [0, 1, 2, 3, 6, 5, 4]  # specials, then old pieces at their new ids
    assert src[7] == 5 and plan.how[7] == PREFIX  # abcde <- abc (longest), not ab
    assert src[9] == 4 and plan.how[9] == PREFIX  # abx <- ab
    assert plan.how[8] == RANDOM and 4 <= src[8] < 7  # zzz: a random ordinary old row
    assert src[12] == 8 and src[11] == 7 and plan.how[11] == KEPT  # sentinels 0, 1 at the new end
    assert plan.how[10] == RANDOM  # <extra_id_2>, new
    assert all(plan.how[13:] == RANDOM)  # padding rows past the vocabulary


def test_a_vocabulary_that_is_not_a_superset_is_refused():
    with pytest.raises(ConfigError, match="not a subset of the new vocabulary.*'lost'"):
        plan_extension(SPECIALS + ["a", "lost"], SPECIALS + ["a", "b"], 0, 0, new_rows=6)
