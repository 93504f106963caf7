"""Prompt files: round trip, the backbone fingerprint, and refusals (another backbone, bad file);
the initialisers read the backbone's embedding."""
import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.errors import CheckpointError, ConfigError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.prompts import PromptConfig, files, init

PROMPT = PromptConfig(length=3, num_tasks=2, placement=("front", "front:1+middle:2"), mask="text_blind",
                      decoder_length=2)
CONFIG = get_config("tiny", vocab_size=64, prompt=PROMPT, num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def params():
    ones = np.ones((1, 4), np.int32)
    return nn.unbox(jax.jit(EncoderDecoder(CONFIG).init)(jax.random.PRNGKey(0), ones, ones)["params"])


def test_round_trip_keeps_vectors_placement_and_backbone(params, tmp_path):
    paths = files.save_tuned_prompts(params, CONFIG, tmp_path, task_names=["lcqmc", "math"])
    assert [p.name for p in paths] == ["lcqmc.prompt.npz", "math.prompt.npz"]
    loaded = [files.load_prompt(p) for p in paths]
    table, decoder_table = (np.asarray(params["prompt"][k]) for k in ("table", "decoder_table"))
    for t, f in enumerate(loaded):
        assert np.array_equal(f.vectors, table[t]) and np.array_equal(f.decoder_vectors, decoder_table[t])
        files.check_backbone(f, CONFIG, files.backbone_fingerprint(params))
    served = files.prompt_config_for(loaded)
    assert served.placements() == ("front", "front:1+middle:2") and served.mask == "text_blind"
    assert served.decoder_length == 2
    assert np.array_equal(files.table_of(loaded), table)
    assert np.array_equal(files.decoder_table_of(loaded), decoder_table)
    assert paths[0].stat().st_size < 10_000
    with pytest.raises(ConfigError, match="exists"):  # never overwritten silently
        files.save_tuned_prompts(params, CONFIG, tmp_path, task_names=["lcqmc", "math"])


def test_fingerprint_ignores_prompt_and_storage_dtype_but_not_weights(params):
    base = files.backbone_fingerprint(params)
    as_bf16 = jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), params)
    assert files.backbone_fingerprint(as_bf16) == base
    other_prompt = files.with_table(params, params["prompt"]["table"] + 1, params["prompt"]["decoder_table"] + 1)
    assert files.backbone_fingerprint(other_prompt) == base
    changed = dict(params, token_embedder={"embedding": params["token_embedder"]["embedding"] * 2})
    assert files.backbone_fingerprint(changed) != base


def test_prompt_for_another_backbone_is_one_clear_error(params, tmp_path):
    path, = files.save_tuned_prompts(params, CONFIG, tmp_path, task_names=None)[:1]
    loaded = files.load_prompt(path)
    with pytest.raises(CheckpointError, match=r"task0.prompt.npz' was tuned on another backbone: d_model=64 "
                                              r"\(this backbone: 128\)"):
        files.check_backbone(loaded, CONFIG.replace(d_model=128), None)
    with pytest.raises(CheckpointError, match="parameter fingerprint .* differs from this checkpoint's"):
        files.check_backbone(loaded, CONFIG, "0" * 64)
    bad = tmp_path / "bad.prompt.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.prompt.npz' is not a readable prompt file"):
        files.load_prompt(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        files.load_prompt(tmp_path / "missing.npz")
    # Served together, prompts must share one decoder prompt length (one decoder table).
    encoder_only = dataclasses.replace(loaded, decoder_vectors=None)
    with pytest.raises(ConfigError, match=r"differ in \(length, decoder length\) \[\(3, 0\), \(3, 2\)\]"):
        files.prompt_config_for([loaded, encoder_only])


def test_initialisers_read_the_backbone_embedding(params, tmp_path):
    emb = np.asarray(params["token_embedder"]["embedding"])
    def table(name="table", **fields):
        config = CONFIG.replace(prompt=PromptConfig(**{**PROMPT.to_dict(), **fields}))
        return np.asarray(init.initialize(params, config)["prompt"][name])

    assert np.array_equal(table(init="token"), np.broadcast_to(emb[63], (2, 3, emb.shape[1])))  # last id
    assert np.array_equal(table(init="token", init_token=7)[1, 2], emb[7])
    assert np.array_equal(table(init="text", init_text=[9, 10])[0], emb[[9, 10, 9]])
    assert np.array_equal(table("decoder_table", init="text", init_text=[9, 10, 11])[1], emb[[9, 10]])
    assert np.array_equal(table("decoder_table", init="token", init_token=7)[0, 1], emb[7])
    sampled = table(init="vocab", init_seed=1)
    rows = {tuple(r) for r in emb[3:]}
    assert all(tuple(v) in rows for v in sampled.reshape(-1, emb.shape[1]))
    assert not np.array_equal(sampled[0, 0], sampled[0, 1]) or not np.array_equal(sampled[0, 1], sampled[1, 0])
    path, = files.save_tuned_prompts(params, CONFIG, tmp_path, task_names=["a", "b"])[:1]
    assert np.array_equal(table(init="file", init_file=str(path))[1], np.asarray(params["prompt"]["table"][0]))
    assert np.array_equal(table("decoder_table", init="file", init_file=str(path))[1],
                          np.asarray(params["prompt"]["decoder_table"][0]))
    with pytest.raises(ConfigError, match="holds 2 decoder vectors, PromptConfig.decoder_length is 3"):
        table(init="file", init_file=str(path), decoder_length=3)
    with pytest.raises(ConfigError, match="init_token 99 is outside the vocabulary"):
        table(init="token", init_token=99)


@pytest.fixture(scope="module")
def pair_mixture(shared_data):
    """A registered two-task mixture: poem_next_line (row 0), translation_match (row 1)."""
    import seqio
    from cpm2_jax.tasks import pipeline

    pipeline.get_provider("poem_next_line"), pipeline.get_provider("translation_match")
    if "prompt_files_pair" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("prompt_files_pair", [("poem_next_line", 1.0), ("translation_match", 1.0)])
    return "prompt_files_pair"


def test_run_task_names_follow_the_rows_training_assigns(pair_mixture):
    assert files.run_task_names(pair_mixture, 2) == ["poem_next_line", "translation_match"]
    assert files.run_task_names(pair_mixture, 3) == ["poem_next_line", "translation_match", "task2"]
    assert files.run_task_names("translation_match", 1) == ["translation_match"]
    assert files.run_task_names("no_such_task", 2) == ["task0", "task1"]
    assert files.run_task_names(None, 1) == ["task0"]


def test_a_run_writes_and_replaces_its_prompt_files(params, tmp_path, pair_mixture):
    first = files.save_run_prompts(params, CONFIG, tmp_path / "prompts", pair_mixture)
    assert [p.name for p in first] == ["poem_next_line.prompt.npz", "translation_match.prompt.npz"]
    later = files.with_table(params, params["prompt"]["table"] + 1, params["prompt"]["decoder_table"])
    again = files.save_run_prompts(later, CONFIG, tmp_path / "prompts", pair_mixture)  # the run's own files
    assert again == first
    assert np.array_equal(files.load_prompt(again[1]).vectors, np.asarray(params["prompt"]["table"][1]) + 1)
    (tmp_path / "blocked").write_text("a file where the directory should be")
    with pytest.raises(CheckpointError, match="cannot write prompt files to .*blocked"):
        files.save_run_prompts(params, CONFIG, tmp_path / "blocked", pair_mixture)


def test_convert_to_prompts_writes_a_checkpoints_prompts(params, tmp_path, capsys, pair_mixture):
    from cpm2_jax import checkpoints as ckpt_lib
    from cpm2_jax import cli
    from cpm2_jax.trainer import Trainer, TrainerConfig
    from cpm2_jax.partitioning import make_mesh

    trainer = Trainer(CONFIG, TrainerConfig(), make_mesh({"data": 1}))
    run = tmp_path / "run"
    ckpts = ckpt_lib.Checkpoints(run / "checkpoints")
    record = ckpt_lib.config_record(CONFIG, extra={"train_dataset": {"mixture_or_task_name": pair_mixture}})
    ckpts.save(trainer.state_from_params(params), data_state={"step": 0}, config=record)
    ckpts.close()

    assert cli.main(["convert", "to-prompts", str(run), str(tmp_path / "out")]) == 0
    written = [pathlib.Path(p) for p in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]]
    assert [p.name for p in written] == ["poem_next_line.prompt.npz", "translation_match.prompt.npz"]
    for t, path in enumerate(written):
        loaded = files.load_prompt(path)
        assert np.array_equal(loaded.vectors, np.asarray(params["prompt"]["table"][t]))
        assert loaded.placement == PROMPT.placements()[t]
        files.check_backbone(loaded, CONFIG, files.backbone_fingerprint(params))

    assert cli.main(["convert", "to-prompts", str(run), str(tmp_path / "named"), "--task_names", "a,b"]) == 0
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == ["a.prompt.npz", "b.prompt.npz"]
    capsys.readouterr()
    assert cli.main(["convert", "to-prompts", str(run), str(tmp_path / "three"), "--task_names", "a,b,c"]) == 2
    assert "--task_names gives 3 names; the prompt table has 2 row(s)" in capsys.readouterr().err
    assert cli.main(["convert", "to-prompts", str(run), str(tmp_path / "out")]) == 2  # never overwritten
    assert "is not empty" in capsys.readouterr().err
    dense = tmp_path / "dense"
    ckpts = ckpt_lib.Checkpoints(dense / "checkpoints")
    backbone = {k: v for k, v in params.items() if k != "prompt"}
    plain = CONFIG.replace(prompt=None)
    ckpts.save(Trainer(plain, TrainerConfig(), make_mesh({"data": 1})).state_from_params(backbone),
               data_state={"step": 0}, config=ckpt_lib.config_record(plain))
    ckpts.close()
    assert cli.main(["convert", "to-prompts", str(dense), str(tmp_path / "none")]) == 2
    assert "has no prompt table" in capsys.readouterr().err
