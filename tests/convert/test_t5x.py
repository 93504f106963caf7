"""t5x checkpoints: `cpm2 convert from-t5x` on a checkpoint written here in t5x's layout.

A random transformers MT5 model is the reference; its weights are written as t5x stores
mT5 (the names of t5x/examples/t5/network.py, 2-D DenseGeneral kernels = the torch weights
transposed, as transformers' own t5x converter reads them) in a `checkpoint` msgpack with
TensorStore zarr arrays beside it (no t5x package). The import must give transformers'
logits and the same params as the (separately tested) transformers converter.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ts = pytest.importorskip("tensorstore")

from cpm2_jax import cli  # noqa: E402
from cpm2_jax.checkpoints import load_params  # noqa: E402
from cpm2_jax.convert import native, params_from_hf_state_dict  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from tests.convert.hf_models import TEST_CONFIG, hf_logits, numpy_state_dict, random_mt5  # noqa: E402


def t5x_tree(hf: dict, enc_layers: int, dec_layers: int) -> dict[str, np.ndarray]:
    """{t5x name under target/: array} of an HF MT5 state dict."""
    out = {"token_embedder/embedding": hf["shared.weight"], "decoder/logits_dense/kernel": hf["lm_head.weight"].T}
    for stack, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
        attentions = [("attention", "0.SelfAttention", "pre_attention_layer_norm")] if stack == "encoder" else [
            ("self_attention", "0.SelfAttention", "pre_self_attention_layer_norm"),
            ("encoder_decoder_attention", "1.EncDecAttention", "pre_cross_attention_layer_norm")]
        for i in range(layers):
            hf_layer, layer = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
            for name, module, norm in attentions:
                for t5x_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    out[f"{layer}/{name}/{t5x_name}/kernel"] = hf[f"{hf_layer}.{module}.{hf_name}.weight"].T
                out[f"{layer}/{norm}/scale"] = hf[f"{hf_layer}.{module[0]}.layer_norm.weight"]
            ff = f"{hf_layer}.{1 if stack == 'encoder' else 2}"
            for w in ("wi_0", "wi_1", "wo"):
                out[f"{layer}/mlp/{w}/kernel"] = hf[f"{ff}.DenseReluDense.{w}.weight"].T
            out[f"{layer}/pre_mlp_layer_norm/scale"] = hf[f"{ff}.layer_norm.weight"]
        out[f"{stack}/relpos_bias/rel_embedding"] = hf[f"{stack}.block.0.layer.0.SelfAttention."
                                                       "relative_attention_bias.weight"].T
        out[f"{stack}/{stack}_norm/scale"] = hf[f"{stack}.final_layer_norm.weight"]
    return out


def write_t5x_checkpoint(directory: pathlib.Path, tree: dict[str, np.ndarray]) -> pathlib.Path:
    """t5x's on-disk layout: norm scales inline in the msgpack, every other array a gzip zarr
    TensorStore named `target.a.b.kernel`, its spec (relative path) in the msgpack; the
    embedding's spec as written to GCS (t5x's dummy bucket)."""
    from flax import serialization

    directory.mkdir(parents=True)
    target: dict = {}
    for name, x in tree.items():
        x = np.ascontiguousarray(x, np.float32)
        node = target
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        if name.endswith("/scale"):
            node[leaf] = x
            continue
        relative = "target." + name.replace("/", ".")
        spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": relative},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(x.shape), "chunks": list(x.shape)}}
        absolute = {**spec, "kvstore": {"driver": "file", "path": str(directory / relative)}}
        ts.open(absolute, create=True, open=True).result().write(x).result()
        if name == "token_embedder/embedding":
            spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": relative}
        node[leaf] = spec
    state = {"step": np.int32(1000000), "param_states": {"token_embedder": {"embedding": {"v": np.zeros(1)}}}}
    contents = {"version": 3, "optimizer": {"target": target, "state": state}}
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = random_mt5(TEST_CONFIG, seed=5)
    hf = numpy_state_dict(model)
    tree = t5x_tree(hf, TEST_CONFIG.num_encoder_layers, TEST_CONFIG.num_decoder_layers)
    return model, hf, write_t5x_checkpoint(tmp_path_factory.mktemp("t5x") / "checkpoint_1000000", tree)


def test_from_t5x_gives_transformers_logits(reference, tmp_path):
    model, hf, t5x_dir = reference
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "from-t5x", str(t5x_dir), str(out)]) == 0
    params, config = load_params(out)
    assert config == TEST_CONFIG.replace(dropout_rate=config.dropout_rate, init_std=config.init_std)
    expected = native.flatten_params(params_from_hf_state_dict(hf, TEST_CONFIG))
    got = native.flatten_params(params)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    rng = np.random.default_rng(1)
    enc = rng.integers(2, TEST_CONFIG.vocab_size, (2, 11))
    dec = rng.integers(2, TEST_CONFIG.vocab_size, (2, 6))
    enc[1, 7:] = 0
    ours = np.asarray(jax.jit(EncoderDecoder(config).apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))
    np.testing.assert_allclose(ours, hf_logits(model, enc, dec), rtol=2e-4, atol=2e-4)


def test_bad_t5x_checkpoints_fail_in_one_line(reference, tmp_path, capsys):
    _, _, t5x_dir = reference
    out = tmp_path / "ckpt"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint").write_bytes(b"\xc1 not msgpack")
    assert cli.main(["convert", "from-t5x", str(broken), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot decode t5x checkpoint" in err[0], err
    # An array file gone: named, and nothing written.
    missing = tmp_path / "missing"
    import shutil

    shutil.copytree(t5x_dir, missing)
    shutil.rmtree(missing / "target.encoder.layers_0.mlp.wo.kernel")
    assert cli.main(["convert", "from-t5x", str(missing), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target/encoder/layers_0/mlp/wo/kernel" in err[0], err
    assert not out.exists()
