"""Upcycling: the upcycled model's logits equal the dense model's at step 0; mismatched
checkpoints and configs give clear errors; `cpm2 convert dense-to-moe` end to end."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.errors import CheckpointError, ConfigError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.moe.upcycle import check_params_fit, upcycle_params


def batch():
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(1, 512, (4, 16)), jnp.int32)
    dec = jnp.asarray(rng.randint(1, 512, (4, 8)), jnp.int32)
    return enc, dec


# One backend per layout: tests/moe/test_layer.py ties the backends' outputs to each other.
@pytest.mark.parametrize("scan,backend", [(False, "padded"), (True, "ragged_dot")])
def test_upcycled_logits_equal_dense(scan, backend):
    dense_c = get_config("tiny", init_std=0.05, scan_layers=scan)
    moe_c = dense_c.replace(num_experts=4, moe_router="balanced")
    enc, dec = batch()
    dense_params = nn.unbox(jax.jit(EncoderDecoder(dense_c).init)(jax.random.PRNGKey(0), enc, dec))["params"]
    moe_params = upcycle_params(dense_params, dense_c, moe_c, rng=1)
    shapes = jax.eval_shape(lambda: nn.unbox(EncoderDecoder(moe_c).init(jax.random.PRNGKey(0), enc, dec))["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(moe_params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(moe_params)))
    dense_logits = jax.jit(EncoderDecoder(dense_c).apply)({"params": dense_params}, enc, dec)
    apply = jax.jit(EncoderDecoder(moe_c.replace(moe_backend=backend)).apply, static_argnames="enable_dropout")
    # Training-mode routing (balanced assignment) and the inference argmax fallback alike.
    train = apply({"params": moe_params}, enc, dec, enable_dropout=True)
    infer = apply({"params": moe_params}, enc, dec)
    np.testing.assert_allclose(np.asarray(train), np.asarray(dense_logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(infer), np.asarray(dense_logits), rtol=1e-5, atol=1e-6)


def test_mismatched_checkpoints_and_configs():
    dense_c = get_config("tiny")
    moe_c = dense_c.replace(num_experts=4)
    enc, dec = batch()
    dense_params = nn.unbox(EncoderDecoder(dense_c).init(jax.random.PRNGKey(0), enc, dec))["params"]
    moe_params = upcycle_params(dense_params, dense_c, moe_c)
    with pytest.raises(CheckpointError, match=r"MoE model \(4 experts.*config is dense"):
        check_params_fit(moe_params, dense_c)
    with pytest.raises(CheckpointError, match="dense-to-moe"):
        check_params_fit(dense_params, moe_c)
    with pytest.raises(CheckpointError, match="holds 4 experts"):
        check_params_fit(moe_params, dense_c.replace(num_experts=8))
    check_params_fit(moe_params, moe_c)
    with pytest.raises(ConfigError, match="d_model"):
        upcycle_params(dense_params, dense_c, moe_c.replace(d_model=32))
    with pytest.raises(ConfigError, match="already has num_experts"):
        upcycle_params(moe_params, moe_c, moe_c)


def test_cli_dense_to_moe(tmp_path, capsys):
    from cpm2_jax.cli import main
    from cpm2_jax.convert.native import load_params, save_params

    dense_c = get_config("tiny")
    enc, dec = batch()
    dense_params = nn.unbox(EncoderDecoder(dense_c).init(jax.random.PRNGKey(0), enc, dec))["params"]
    save_params(dense_params, dense_c, tmp_path / "dense")
    assert main(["convert", "dense-to-moe", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num_experts", "4"]) == 0
    params, config = load_params(tmp_path / "moe")
    assert config.num_experts == 4 and config.moe_router == "balanced"
    wi_0 = params["encoder"]["layers_0"]["moe"]["experts"]["wi_0"]
    np.testing.assert_array_equal(wi_0[3], dense_params["encoder"]["layers_0"]["mlp"]["wi_0"])
    assert main(["convert", "dense-to-moe", str(tmp_path / "moe"), str(tmp_path / "again"), "--num_experts", "4"]) == 2
    assert "already has num_experts" in capsys.readouterr().err


def test_upcycle_into_switch_layout():
    """MoE every other layer with a shared pre-norm (Switch): only those layers change, the
    experts copy the ReLU FFN, and the result has the MoE model's exact tree."""
    dense_c = get_config("tiny", ffn_activation="relu", num_encoder_layers=4)
    moe_c = dense_c.replace(num_experts=4, moe_router="top_k", moe_expert_norm=False, moe_encoder_sparse_step=2,
                            moe_router_bias=True, moe_expert_capacity=8)
    enc, dec = batch()
    dense_params = nn.unbox(EncoderDecoder(dense_c).init(jax.random.PRNGKey(0), enc, dec))["params"]
    moe_params = upcycle_params(dense_params, dense_c, moe_c)
    shapes = jax.eval_shape(lambda: nn.unbox(EncoderDecoder(moe_c).init(jax.random.PRNGKey(0), enc, dec))["params"])
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, moe_params)
    check_params_fit(moe_params, moe_c)
    enc_dense, enc_moe = dense_params["encoder"], moe_params["encoder"]
    np.testing.assert_array_equal(enc_moe["layers_0"]["mlp"]["wi"], enc_dense["layers_0"]["mlp"]["wi"])
    np.testing.assert_array_equal(enc_moe["layers_1"]["moe"]["experts"]["wi"][2], enc_dense["layers_1"]["mlp"]["wi"])
    np.testing.assert_array_equal(enc_moe["layers_1"]["pre_mlp_layer_norm"]["scale"],
                                  enc_dense["layers_1"]["pre_mlp_layer_norm"]["scale"])
    with pytest.raises(CheckpointError, match="decoder/layers_0/mlp/wo"):
        check_params_fit(dense_params, moe_c)


def test_every_moe_switch_may_differ_from_the_dense_source():
    """Upcycling may set any `moe_*` field (the shuffle, the Pallas switches), never a dense one."""
    from cpm2_jax.moe.upcycle import check_compatible

    dense = get_config("tiny")
    check_compatible(dense, dense.replace(num_experts=4, moe_shuffle_tokens=False, moe_fused_ffn=True,
                                          moe_permute_kernels=False, moe_backend="pallas"))
    with pytest.raises(ConfigError, match="d_ff"):
        check_compatible(dense, dense.replace(num_experts=4, d_ff=dense.d_ff * 2))
