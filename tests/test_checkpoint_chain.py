"""One checkpoint format through every command (subprocesses of `cpm2`, tiny sizes):

transformers 5 MT5 (saved tied) -> convert from-hf -> train 5 steps (restore_from, scanned)
-> convert dense-to-moe -> train the MoE 5 steps (unscanned) -> convert to-hf (Switch) ->
`from_pretrained` logits equal this project's; and the scanned run's checkpoint decoded by an
unscanned config gives the tokens the scanned config gives.

One chain (a module fixture) serves every assertion; each hand-off crosses a layer layout
(unscanned import -> scanned run -> scanned upcycle -> unscanned MoE run).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpm2_jax import checkpoints as ckpt_lib  # noqa: E402
from cpm2_jax import param_paths  # noqa: E402
from cpm2_jax.config import get_config  # noqa: E402
from tests.convert.hf_models import hf_logits, random_tied_mt5  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Switch's experts (and so its dense blocks) are ReLU FFNs; 2 heads x 8 != d_model 32 and 2 encoder
# vs 1 decoder layers, so no two sizes coincide. 320 ids hold the byte-pair fixture's (byte + 3).
DENSE = get_config("tiny", vocab_size=320, d_model=32, d_ff=48, num_heads=2, head_dim=8, num_encoder_layers=2,
                   num_decoder_layers=1, ffn_activation="relu")
UPCYCLE = ["--num_experts", 2, "--router", "top_k", "--expert_capacity", 32, "--shared_norm", "--router_bias"]
STEPS = 5


def cpm2(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO),  # tests.* gin imports
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = pathlib.Path(sys.executable).with_name("cpm2")  # the console script the project installs
    done = subprocess.run([str(command), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"cpm2 {' '.join(map(str, args[:2]))}: {done.stderr[-3000:]}"
    return done


def model_flags(config) -> list[str]:
    """Every field of `config` as a --gin.cpm2_jax.model_config binding (the model gin file's values replaced)."""
    return [f"--gin.cpm2_jax.model_config.{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
            if f.name != "prompt"]


def train(model_dir, start, config):
    """`cpm2 train` STEPS steps of the byte-pair fixture (batch 2) starting from checkpoint `start`."""
    cpm2("train", "--gin_file=models/tiny.gin", "--gin_file=runs/finetune.gin", "--gin_file=tests/gin/byte_pairs.gin",
         *model_flags(config), f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=2",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", "--gin.EVAL_PERIOD=0",
         "--gin.cpm2_jax.train.train.eval_dataset_cfg=None", "--gin.CHECKPOINT_PERIOD=0", "--gin.LEARNING_RATE=1e-3",
         f"--gin.INITIAL_CHECKPOINT_PATH='{start}'", f"--gin.MODEL_DIR='{model_dir}'", "--no_progress")


def _flat(params):
    return {k: np.asarray(v) for k, v in param_paths.flatten(params).items()}


def _moved_a_little(before, after):
    """Every parameter changed by training, and by less than 5 AdamW steps of 1e-3 can move it
    (so the run started from `before`, not from a fresh initialisation)."""
    assert before.keys() == after.keys()
    moved = {k: float(np.abs(after[k] - before[k]).max()) for k in before}
    assert max(moved.values()) > 0 and max(moved.values()) < STEPS * 2e-3, moved


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    paths = {name: root / name for name in ("hf", "imported", "dense", "upcycled", "moe", "switch")}
    random_tied_mt5(DENSE, seed=2).save_pretrained(str(paths["hf"]))
    cpm2("convert", "from-hf", paths["hf"], paths["imported"])
    train(paths["dense"], paths["imported"], DENSE.replace(scan_layers=True))  # scanned, from an unscanned import
    cpm2("convert", "dense-to-moe", paths["dense"], paths["upcycled"], *UPCYCLE)  # reads the scanned run
    upcycled = ckpt_lib.saved_model_config(ckpt_lib.resolve(paths["upcycled"]))
    train(paths["moe"], paths["upcycled"], upcycled.replace(scan_layers=False))  # unscanned, from a scanned start
    cpm2("convert", "to-hf", paths["moe"], paths["switch"])
    return paths


def test_transformers_5_saved_the_mt5_tied(chain):
    from safetensors.numpy import load_file

    assert "lm_head.weight" not in load_file(str(chain["hf"] / "model.safetensors"))


def test_each_run_starts_from_the_previous_checkpoint(chain):
    imported, config = ckpt_lib.load_params(chain["imported"])
    assert config == DENSE
    dense, dense_config = ckpt_lib.load_params(chain["dense"], DENSE)  # the scanned run read back unscanned
    assert ckpt_lib.step_number(ckpt_lib.resolve(chain["dense"])) == STEPS
    assert ckpt_lib.saved_model_config(ckpt_lib.resolve(chain["dense"])) == DENSE.replace(scan_layers=True)
    _moved_a_little(_flat(imported), _flat(dense))

    upcycled, upcycled_config = ckpt_lib.load_params(chain["upcycled"])
    moe, moe_config = ckpt_lib.load_params(chain["moe"])
    assert upcycled_config.num_experts == 2 and upcycled_config.scan_layers
    assert moe_config == upcycled_config.replace(scan_layers=False)
    _moved_a_little(_flat(ckpt_lib.load_params(chain["upcycled"], moe_config)[0]), _flat(moe))


def test_switch_export_gives_this_projects_logits(chain):
    from cpm2_jax.model.transformer import EncoderDecoder

    params, config = ckpt_lib.load_params(chain["moe"])
    switch = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(chain["switch"])).eval()
    rng = np.random.default_rng(0)
    enc, dec = rng.integers(2, DENSE.vocab_size, (2, 12)), rng.integers(2, DENSE.vocab_size, (2, 7))
    enc[1, 8:] = 0
    ours = np.asarray(EncoderDecoder(config).apply({"params": params}, enc, dec))
    np.testing.assert_allclose(ours, hf_logits(switch, enc, dec), atol=1e-4, rtol=0)


def test_scanned_run_decoded_by_an_unscanned_config_gives_the_same_tokens(chain):
    from cpm2_jax import decoding

    enc = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [40, 41, 42, 43, 44, 45, 46, 1]], np.int32)
    tokens = []
    for scan in (True, False):
        params, config = ckpt_lib.load_params(chain["dense"], DENSE.replace(scan_layers=scan))
        out = decoding.decode(params, enc, config=config, max_new_tokens=8)
        tokens.append(np.asarray(jax.device_get(out.tokens)))
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert (tokens[0] > 1).any()  # something was generated
