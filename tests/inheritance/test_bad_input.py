"""Knowledge inheritance's bad input through `cpm2 train`: one line each, exit status 2."""
import pytest

from cpm2_jax import cli



def _ki_run(model_dir, *extra):
    return ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/ki_pretrain.gin",
            "--gin_file=tests/gin/byte_pairs.gin", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8",
            f"--gin.MODEL_DIR='{model_dir}'", "--no_progress", *extra]


@pytest.mark.parametrize("flags,expected", [
    (["--gin.TEACHER_CHECKPOINT_PATH='/nonexistent/teacher'"], "teacher checkpoint (TEACHER_CHECKPOINT_PATH)"),
    (["--gin.TEACHER_CHECKPOINT_PATH='/nonexistent/teacher'", "--gin.KI_STEPS=0"], "inherit_steps (N) must be > 0"),
    (["--gin.TEACHER_CHECKPOINT_PATH='/nonexistent/teacher'", "--gin.KI_STEPS=-5"], "inherit_steps (N) must be > 0"),
    (["--gin.TEACHER_CHECKPOINT_PATH='/nonexistent/teacher'", "--gin.KI_TEMPERATURE=0.0"],
     "temperature (T) must be > 0"),
    (["--gin.TEACHER_CHECKPOINT_PATH='/nonexistent/teacher'",
      "--gin.KI_TEACHER_VOCABULARY='{vocab}/bilingual_vocab.txt'",
      "--gin.KI_STUDENT_VOCABULARY='{vocab}/zh_vocab.txt'"], "is not a subset of vocabulary"),
], ids=["missing-teacher", "N-zero", "N-negative", "T-zero", "not-a-subset"])
def test_one_line_exit_2(flags, expected, tmp_path, capsys, shared_data):
    flags = [f.format(vocab=shared_data / "cpm2_vocab") for f in flags]
    code = cli.main(_ki_run(tmp_path / "run", *flags))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cpm2 train: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a rejected run leaves nothing behind


def test_teacher_topk_command_names_its_missing_macros(capsys):
    code = cli.main(["teacher-topk", "--gin_file=models/tiny.gin", "--gin_file=runs/ki_pretrain.gin",
                     "--gin_file=runs/teacher_topk.gin", "--gin_file=tests/gin/byte_pairs.gin",
                     "--gin.TRAIN_STEPS=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cpm2 teacher-topk: error: ") and len(err.strip().splitlines()) == 1, err
    assert err.split("not set: ")[1].split(".")[0] == "TEACHER_CHECKPOINT_PATH, TEACHER_OUTPUTS", err
