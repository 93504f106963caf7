"""CPM-2's three stages end to end through the `cpm2` command, at tiny size on ../shared/data:
Chinese -> (extend-vocab) bilingual -> (dense-to-moe) MoE; each stage starts from the
function the previous one ended with."""
import jax
import numpy as np

from cpm2_jax import cli
from cpm2_jax.infer import load_checkpoint
from cpm2_jax.inheritance.vocab_map import map_vocabularies
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.tasks.vocabulary import WordPieceVocabulary

TEXT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
COMMON = ["--gin_file=models/tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
          "--gin.BATCH_SIZE=2", "--gin.MESH_SHAPE={'data': 1}", "--gin.WARMUP_STEPS=1", "--gin.CHECKPOINT_PERIOD=0",
          "--gin.cpm2_jax.train.train.eval_dataset_cfg=None", "--gin.cpm2_jax.model_config.d_model=32",
          "--gin.cpm2_jax.model_config.d_ff=64", "--gin.cpm2_jax.model_config.num_encoder_layers=1",
          "--gin.cpm2_jax.model_config.num_decoder_layers=1", "--no_progress"]


def _train(stage, model_dir, steps, *extra):
    argv = ["train", *COMMON, f"--gin_file=runs/{stage}.gin", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.MODEL_DIR='{model_dir}'", *extra]
    assert cli.main(argv) == 0, argv


def _logits(path, encoder_ids, decoder_ids):
    params, config = load_checkpoint(path)
    out = EncoderDecoder(config).apply({"params": params}, encoder_ids[None], decoder_ids[None], enable_dropout=False)
    return np.asarray(jax.device_get(out))[0], config


def test_chinese_bilingual_moe(shared_data, tmp_path):
    zh_file = shared_data / "cpm2_vocab" / "zh_vocab.txt"
    bi_file = shared_data / "cpm2_vocab" / "bilingual_vocab.txt"
    zh_vocab = [f"--gin.ZH_VOCABULARY='{zh_file}'"]
    bi_vocab = [f"--gin.BILINGUAL_VOCABULARY='{bi_file}'"]
    stage1, stage2, stage3 = (tmp_path / f"stage{i}" for i in (1, 2, 3))

    _train("cpm2_stage1_zh", stage1, 2, *zh_vocab)
    assert cli.main(["convert", "extend-vocab", str(stage1), str(bi_file), str(tmp_path / "stage2_init"),
                     "--old_vocab", str(zh_file)]) == 0
    _train("cpm2_stage2_bilingual", stage2, 0, *bi_vocab, f"--gin.INIT_CHECKPOINT='{tmp_path / 'stage2_init'}'")

    # Stage 2 at step 0 on a Chinese input (zh ids, mapped to bilingual ids): every old token's
    # logit, read at its new id, equals stage 1's final one.
    ids = np.asarray(WordPieceVocabulary.from_vocab_txt(zh_file).encode(TEXT) + [1], np.int32)
    decoder_ids = np.concatenate([[0], ids[:7]]).astype(np.int32)
    old_to_new = map_vocabularies(str(zh_file), str(bi_file)).old_to_new
    assert (old_to_new[ids] >= 0).all()
    before, config1 = _logits(stage1, ids, decoder_ids)
    after, config2 = _logits(stage2, old_to_new[ids].astype(np.int32), old_to_new[decoder_ids].astype(np.int32))
    assert (config1.vocab_size, config2.vocab_size) == (26240, 51968)
    kept = old_to_new >= 0
    np.testing.assert_allclose(after[:, old_to_new[kept]], before[:, kept], atol=1e-5, rtol=0)

    _train("cpm2_stage2_bilingual", stage2, 2, *bi_vocab, f"--gin.INIT_CHECKPOINT='{tmp_path / 'stage2_init'}'")
    assert cli.main(["convert", "dense-to-moe", str(stage2), str(tmp_path / "stage3_init"), "--num_experts", "2"]) == 0
    moe_flags = [*bi_vocab, f"--gin.INIT_CHECKPOINT='{tmp_path / 'stage3_init'}'", "--gin.NUM_EXPERTS=2"]
    _train("cpm2_stage3_moe", stage3, 0, *moe_flags)

    # Stage 3 at step 0: the MoE model computes what the dense stage-2 model ended with.
    bi_ids = old_to_new[ids].astype(np.int32)
    dense, _ = _logits(stage2, bi_ids, old_to_new[decoder_ids].astype(np.int32))
    moe, config3 = _logits(stage3, bi_ids, old_to_new[decoder_ids].astype(np.int32))
    assert config3.num_experts == 2
    np.testing.assert_allclose(moe, dense, atol=1e-5, rtol=0)
    _train("cpm2_stage3_moe", stage3, 2, *moe_flags)
    final, _ = _logits(stage3, bi_ids, old_to_new[decoder_ids].astype(np.int32))
    assert np.isfinite(final).all() and not np.allclose(final, moe)  # it trained
