"""The original CPM-2 release's checkpoints: `cpm2 convert from-cpm2 / to-cpm2`.

The weights cannot be downloaded, so the reference is written here: a random transformers
MT5 model (CPM-2's architecture) is the "released" model; its state dict is split into
model-parallel fp16 shards by this file's own reading of Megatron's rules (the release's
`EncDecModel` names, fused q/k/v with stride, vocab-parallel rows), with DeepSpeed's
record around it (training args, numpy RNG state, a set). Checked: the import's logits
equal transformers' (with the embedding rows permuted by the real vocab.txt), `to-cpm2`
writes the reference shards back bit for bit, an MoE release round-trips exactly, and bad
input (a missing or duplicated rank, the wrong vocab.txt, a pickle outside the allow-list)
is one line, exit 2, nothing executed.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpm2_jax import cli  # noqa: E402
from cpm2_jax.checkpoints import load_params, saved_vocabulary, resolve  # noqa: E402
from cpm2_jax.config import get_config  # noqa: E402
from cpm2_jax.convert import native  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from cpm2_jax.tasks.vocabulary import WordPieceVocabulary  # noqa: E402
from tests.convert.hf_models import numpy_state_dict, random_mt5  # noqa: E402

ZH_VOCAB = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cpm2_vocab" / "zh_vocab.txt"
BILINGUAL_VOCAB = ZH_VOCAB.with_name("bilingual_vocab.txt")
pytestmark = pytest.mark.skipif(not ZH_VOCAB.is_file(), reason="the released vocabularies are not present")

# The Chinese release's 26,240 rows; tiny otherwise; 4 heads and d_ff 64 split over mp = 2.
CONFIG = get_config("tiny", vocab_size=26240, d_model=32, d_ff=64, num_heads=4, head_dim=8,
                    num_encoder_layers=2, num_decoder_layers=3)
MP = 2
ITERATION = 100000


def _split_rows(x, rank, mp):
    n = x.shape[0] // mp
    return x[rank * n:(rank + 1) * n]


def _split_cols(x, rank, mp):
    n = x.shape[1] // mp
    return x[:, rank * n:(rank + 1) * n]


def release_state(hf: dict, rank: int, mp: int, layers: tuple[int, int]) -> dict:
    """Rank `rank`'s state dict of the release's EncDecModel, from an HF MT5 state dict (HF and
    the release both keep torch Linear [out, in]); ColumnParallel splits rows, RowParallel columns,
    the fused projections [q; k; v] are split per matrix (Megatron's `stride`)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).half() for k, v in hf.items()}
    rows = lambda x: _split_rows(x, rank, mp)  # noqa: E731
    cols = lambda x: _split_cols(x, rank, mp)  # noqa: E731
    embeds = rows(t["shared.weight"]).clone()
    out = {"word_embeds.weight": embeds, "lm_head.weight": rows(t["lm_head.weight"]).clone()}
    for stack, n_layers in zip(("encoder", "decoder"), layers):
        out[f"{stack}.word_embeds.weight"] = embeds
        for i in range(n_layers):
            hf_layer, block = f"{stack}.block.{i}.layer", f"{stack}.blocks.{i}"
            att = f"{hf_layer}.0.SelfAttention"
            out[f"{block}.self_attn.self_attn.project.weight"] = torch.cat(
                [rows(t[f"{att}.{m}.weight"]) for m in "qkv"])
            if i == 0:
                out[f"{block}.self_attn.self_attn.relative_attention_bias.weight"] = cols(
                    t[f"{att}.relative_attention_bias.weight"]).clone()
            out[f"{block}.self_attn.self_attn.dense.weight"] = cols(t[f"{att}.o.weight"]).clone()
            out[f"{block}.self_attn.layer_norm.weight"] = t[f"{hf_layer}.0.layer_norm.weight"]
            ff_index = 1
            if stack == "decoder":
                cross = f"{hf_layer}.1.EncDecAttention"
                out[f"{block}.cross_attn.cross_attn.project_q.weight"] = rows(t[f"{cross}.q.weight"]).clone()
                out[f"{block}.cross_attn.cross_attn.project_kv.weight"] = torch.cat(
                    [rows(t[f"{cross}.{m}.weight"]) for m in "kv"])
                out[f"{block}.cross_attn.cross_attn.dense.weight"] = cols(t[f"{cross}.o.weight"]).clone()
                out[f"{block}.cross_attn.layer_norm.weight"] = t[f"{hf_layer}.1.layer_norm.weight"]
                ff_index = 2
            ff = f"{hf_layer}.{ff_index}"
            for w in ("wi_0", "wi_1"):
                out[f"{block}.ff.dense_relu_dense.{w}.weight"] = rows(t[f"{ff}.DenseReluDense.{w}.weight"]).clone()
            out[f"{block}.ff.dense_relu_dense.wo.weight"] = cols(t[f"{ff}.DenseReluDense.wo.weight"]).clone()
            out[f"{block}.ff.layer_norm.weight"] = t[f"{ff}.layer_norm.weight"]
        out[f"{stack}.final_layernorm.weight"] = t[f"{stack}.final_layer_norm.weight"]
    return out


def write_release_dir(directory: pathlib.Path, states: list[dict]) -> pathlib.Path:
    """The release's directory: ITER/mp_rank_XX_model_states.pt in DeepSpeed's record, with the
    pickled training args, numpy's RNG state and a set beside the weights."""
    (directory / str(ITERATION)).mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    args = argparse.Namespace(model_parallel_size=len(states), fp16=True, lr=1e-3, save="/checkpoints")
    for rank, state in enumerate(states):
        record = {"module": state, "optimizer": None, "lr_scheduler": {"num_iters": ITERATION},
                  "csr_tensor_module_names": set(), "skipped_steps": 0, "global_steps": ITERATION,
                  "global_samples": 0, "dp_world_size": 1, "mp_world_size": len(states), "iteration": ITERATION,
                  "args": args, "np_rng_state": np.random.RandomState(0).get_state(),
                  "torch_rng_state": torch.get_rng_state()}
        torch.save(record, directory / str(ITERATION) / f"mp_rank_{rank:02d}_model_states.pt")
    return directory


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(HF model with the fp16-rounded weights, release directory)."""
    model = random_mt5(CONFIG, seed=3)
    with torch.no_grad():  # the release is fp16: the reference model holds exactly those values
        for p in model.parameters():
            p.copy_(p.half().float())
    hf = numpy_state_dict(model)
    layers = (CONFIG.num_encoder_layers, CONFIG.num_decoder_layers)
    states = [release_state(hf, r, MP, layers) for r in range(MP)]
    return model, write_release_dir(tmp_path_factory.mktemp("release") / "cpm2", states)


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert cli.main(["convert", "from-cpm2", str(released[1]), str(ZH_VOCAB), str(out)]) == 0
    return out


@functools.lru_cache(maxsize=None)
def _apply(config):
    return jax.jit(EncoderDecoder(config).apply)  # one compilation per config and shape


def _logits(params, config, enc, dec):
    return np.asarray(_apply(config)({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


def test_from_cpm2_logits_match_the_released_model(released, imported):
    model, _ = released
    params, config = load_params(imported)
    assert config.vocab_size == 26240 and config.d_ff == 64 and config.num_heads == 4 and config.head_dim == 8
    vocab = WordPieceVocabulary.from_vocab_txt(ZH_VOCAB)
    assert saved_vocabulary(resolve(imported)).load().pieces() == vocab.pieces()
    # Project id i is file line released_ids[i]: sentinels last, `<s_0>` the last id.
    order = vocab.released_ids
    lines = ZH_VOCAB.read_text(encoding="utf-8").splitlines()
    assert lines[order[vocab.sentinel_id(0)]] == "<s_0>" and lines[order[1]] == "<eod>"
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab.vocab_size, (2, 9))
    dec = rng.integers(2, vocab.vocab_size, (2, 5))
    enc[1, 6:] = 0
    dec[:, 0] = 0
    ours = _logits(params, config, enc, dec)
    with torch.inference_mode():  # padding is project id 0, whichever line it has in the file
        theirs = model(input_ids=torch.tensor(order[enc]), attention_mask=torch.tensor(enc > 0).long(),
                       decoder_input_ids=torch.tensor(order[dec])).logits.numpy()[..., order]
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)


def test_to_cpm2_writes_the_release_back_exactly(released, imported, tmp_path):
    out = tmp_path / "exported"
    assert cli.main(["convert", "to-cpm2", str(imported), str(out), "--mp", str(MP),
                     "--iteration", str(ITERATION)]) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATION)
    assert (out / "vocab.txt").read_bytes() == ZH_VOCAB.read_bytes()
    for rank in range(MP):
        name = f"{ITERATION}/mp_rank_{rank:02d}_model_states.pt"
        ref = torch.load(released[1] / name, weights_only=False)["module"]  # written by this test
        ours = torch.load(out / name, weights_only=True)
        assert ours["mp_world_size"] == MP and set(ours["module"]) == set(ref)
        for key, value in ref.items():
            assert ours["module"][key].dtype == torch.float16 and torch.equal(ours["module"][key], value), key
    # from-cpm2 of the export: the same params, so identical logits.
    again = tmp_path / "again"
    assert cli.main(["convert", "from-cpm2", str(out), str(out / "vocab.txt"), str(again)]) == 0
    first, config = load_params(imported)
    second, _ = load_params(again)
    a, b = native.flatten_params(first), native.flatten_params(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = np.arange(2, 14).reshape(2, 6)
    np.testing.assert_array_equal(_logits(first, config, tokens, tokens), _logits(second, config, tokens, tokens))


def test_moe_release_round_trips_exactly(tmp_path):
    """MoE: one file per (expert = data-parallel rank, model-parallel rank); expert e's weights in
    files mp_rank_{e}_XX, the shared ones in every file."""
    from cpm2_jax.checkpoints import save_params, VocabularySpec

    from cpm2_jax.checkpoints.restore import abstract_params

    config = CONFIG.replace(num_experts=2, moe_router="balanced", num_decoder_layers=2)
    tokens = np.arange(2, 10).reshape(2, 4)
    # Random values rounded to fp16, as the release stores them.
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map(lambda x: (rng.standard_normal(x.shape) * 0.3).astype(np.float16).astype(
        np.float32), abstract_params(config))
    ckpt = save_params(params, config, tmp_path / "moe", vocabulary=VocabularySpec(ZH_VOCAB.absolute(), 0))
    release = tmp_path / "moe_release"
    assert cli.main(["convert", "to-cpm2", str(ckpt), str(release), "--mp", str(MP)]) == 0
    files = sorted(p.name for p in (release / "0").iterdir())
    assert files == [f"mp_rank_{e:02d}_{r:02d}_model_states.pt" for e in range(2) for r in range(MP)]
    flat = native.flatten_params(params)
    for e in range(2):
        for r in range(MP):
            state = torch.load(release / "0" / f"mp_rank_{e:02d}_{r:02d}_model_states.pt", weights_only=True)["model"]
            wi_0 = flat[("encoder", "layers_1", "moe", "experts", "wi_0")][e][:, r * 32:(r + 1) * 32].T
            np.testing.assert_array_equal(
                state["encoder.blocks.1.ff.expert_network.dense_relu_dense.wi_0.weight"].float().numpy(), wi_0)
            np.testing.assert_array_equal(state["decoder.blocks.0.ff.expert_centroids"].float().numpy(),
                                          flat[("decoder", "layers_0", "moe", "router", "centroids")].T)
    back = tmp_path / "moe_back"
    assert cli.main(["convert", "from-cpm2", str(release), str(ZH_VOCAB), str(back)]) == 0
    restored, restored_config = load_params(back)
    assert restored_config.num_experts == 2 and restored_config.moe_router == "balanced"
    b = native.flatten_params(restored)
    assert flat.keys() == b.keys() and all(np.array_equal(flat[k], b[k]) for k in flat)
    np.testing.assert_array_equal(_logits(params, config, tokens, tokens), _logits(restored, config, tokens, tokens))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing executed, nothing written
# ---------------------------------------------------------------------------------------------

def _fails(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def _copy_shards(released, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(released[1] / str(ITERATION), shards)
    return shards


def test_missing_and_duplicated_ranks_are_refused(released, tmp_path, capsys):
    shards = _copy_shards(released, tmp_path)
    out = tmp_path / "out"
    shutil.move(shards / "mp_rank_01_model_states.pt", tmp_path / "aside.pt")
    shutil.copy(shards / "mp_rank_00_model_states.pt", shards / "mp_rank_02_model_states.pt")
    _fails(capsys, ["convert", "from-cpm2", str(shards), str(ZH_VOCAB), str(out)], "missing rank(s)")
    shutil.move(tmp_path / "aside.pt", shards / "mp_rank_01_model_states.pt")
    shutil.copy(shards / "mp_rank_01_model_states.pt", shards / "mp_rank_1_model_states.pt")
    _fails(capsys, ["convert", "from-cpm2", str(shards), str(ZH_VOCAB), str(out)], "duplicated rank 1")
    assert not out.exists()


def test_a_vocab_txt_of_another_size_is_refused(released, tmp_path, capsys):
    out = tmp_path / "out"
    lines = len(BILINGUAL_VOCAB.read_text(encoding="utf-8").splitlines())  # 51,968: the last without a newline
    _fails(capsys, ["convert", "from-cpm2", str(released[1]), str(BILINGUAL_VOCAB), str(out)],
           f"has {lines} lines but the checkpoint's embedding has 26240 rows")
    short = tmp_path / "vocab.txt"
    short.write_text("\n".join(ZH_VOCAB.read_text(encoding="utf-8").splitlines()[:20000]) + "\n", encoding="utf-8")
    _fails(capsys, ["convert", "from-cpm2", str(released[1]), str(short), str(out)], "has 20000 lines")
    assert not out.exists()


class _Exploit:
    """Pickles as a call of os.system: a loader that unpickles freely runs it."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_outside_the_allow_list_is_refused_unexecuted(released, tmp_path, capsys):
    shards = _copy_shards(released, tmp_path)
    marker = tmp_path / "executed"
    record = torch.load(shards / "mp_rank_00_model_states.pt", weights_only=False)  # this test's own file
    record["args"] = _Exploit(marker)
    torch.save(record, shards / "mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    _fails(capsys, ["convert", "from-cpm2", str(shards), str(ZH_VOCAB), str(out)], "refused to unpickle")
    assert not marker.exists() and not out.exists()

