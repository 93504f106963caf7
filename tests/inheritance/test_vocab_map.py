"""A teacher whose vocabulary is a subset of the student's: ids mapped by piece, sentinels to
sentinels, its logits scattered onto the student's ids, the KL renormalised over shared ids."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.inheritance.objective import Inheritance
from cpm2_jax.inheritance.schedule import InheritanceConfig
from cpm2_jax.inheritance.teacher import Teacher
from cpm2_jax.inheritance.vocab_map import map_pieces
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.partitioning import make_mesh, rules_for_mesh

SPECIALS = ["<pad>", "</s>", "<unk>", "<sep>"]
TEACHER_PIECES = SPECIALS + ["a", "b", "c"] + ["<extra_id_1>", "<extra_id_0>"]
STUDENT_PIECES = SPECIALS + ["x", "c", "a", "y", "b"] + ["<extra_id_2>", "<extra_id_1>", "<extra_id_0>"]


def test_map_by_piece_with_sentinels_to_sentinels():
    id_map = map_pieces(TEACHER_PIECES, STUDENT_PIECES, 2, 3)
    assert list(id_map.old_to_new) == [0, 1, 2, 3, 6, 8, 5, 10, 11]
    assert list(np.nonzero(~id_map.shared_mask(12))[0]) == [4, 7, 9]  # x, y, <extra_id_2>
    assert list(id_map.new_to_old(12)) == [0, 1, 2, 3, 2, 6, 4, 2, 5, 2, 7, 8]  # unknown -> unk


@pytest.fixture(scope="module")
def subset_teacher():
    config = get_config("tiny").replace(vocab_size=16, d_model=16, d_ff=32, num_heads=2, head_dim=8,
                                        num_encoder_layers=1, num_decoder_layers=1)
    ones = np.ones((1, 4), np.int32)
    params = nn.unbox(EncoderDecoder(config).init(jax.random.PRNGKey(1), ones, ones))["params"]
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 2000.0
    mesh = make_mesh({"data": 1})
    id_map = map_pieces(TEACHER_PIECES, STUDENT_PIECES, 2, 3)
    teacher = Teacher(params, config, mesh, rules_for_mesh(mesh.axis_names), student_vocab_size=16, id_map=id_map)
    return teacher, params, config, id_map


# a x b c </s>: x is unknown to the teacher; y too. Both tests use these shapes: one compile.
STUDENT_BATCH = {"encoder_input_tokens": np.array([[6, 4, 8, 5, 1]], np.int32),
                 "decoder_input_tokens": np.array([[0, 6, 7, 5]], np.int32)}


def test_teacher_logits_land_on_student_ids(subset_teacher):
    teacher, params, config, id_map = subset_teacher
    mapped = np.asarray(teacher.logits(teacher.params, STUDENT_BATCH))
    raw = np.asarray(EncoderDecoder(config).apply({"params": params}, np.array([[4, 2, 5, 6, 1]], np.int32),
                                                  np.array([[0, 4, 2, 6]], np.int32)))
    kept = id_map.old_to_new >= 0
    np.testing.assert_allclose(mapped[..., id_map.old_to_new[kept]], raw[..., :len(kept)][..., kept], rtol=1e-6)
    assert np.all(np.isneginf(mapped[..., ~id_map.shared_mask(16)]))  # x, y, <extra_id_2>, padding rows


def test_unmapped_ids_get_their_mass_from_the_lm_term_only(subset_teacher):
    teacher, _, _, id_map = subset_teacher
    ki = Inheritance(InheritanceConfig(teacher_checkpoint="unused", inherit_steps=10), teacher)
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(1, 3, 16)), jnp.float32)
    teacher_logits = jnp.where(teacher.shared, jnp.asarray(rng.normal(size=(1, 3, 16)), jnp.float32), -jnp.inf)
    targets = jnp.array([[6, 4, 5]])  # 'x' (4) is not the teacher's
    weights = jnp.ones((1, 3), jnp.float32)
    sums = ki.sums(student, targets, weights, {"logits": teacher_logits})
    # Both distributions renormalised over the shared ids, by hand (T = 2).
    shared = np.asarray(teacher.shared)
    p = np.exp(np.asarray(teacher_logits)[..., shared] / 2)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(np.asarray(student)[..., shared] / 2)
    q /= q.sum(-1, keepdims=True)
    assert float(sums["kd_sum"]) == pytest.approx(float(4 * np.sum(p * np.log(p / q))), rel=1e-5)
    grad = jax.grad(lambda s: ki.sums(s, targets, weights, {"logits": teacher_logits})["kd_sum"])(student)
    assert np.all(np.asarray(grad)[..., ~shared] == 0.0) and np.abs(np.asarray(grad)[..., shared]).sum() > 0
    # The teacher's loss counts only targets it knows (2 of 3 here).
    assert float(sums["teacher_weight"]) == 2.0


def test_bfloat16_teacher(subset_teacher):
    teacher, params, config, id_map = subset_teacher
    mesh = make_mesh({"data": 1})
    half = Teacher(params, config, mesh, rules_for_mesh(mesh.axis_names), student_vocab_size=16, id_map=id_map,
                   dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    full = np.asarray(teacher.logits(teacher.params, STUDENT_BATCH))
    low = np.asarray(half.logits(half.params, STUDENT_BATCH))
    shared = id_map.shared_mask(16)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low[..., shared], full[..., shared], rtol=0.05, atol=0.05)
