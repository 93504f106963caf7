"""MoE sizes: cpm2_moe_198b counts within 1% of 198B (CPM2_FACTS: 48 x 32 x 125.8M + ~5B shared)."""
from cpm2_jax.config import get_config
from cpm2_jax.footprint import footprint


def test_cpm2_moe_198b_parameter_count():
    c = get_config("cpm2_moe_198b")
    assert (c.num_experts, c.num_encoder_layers, c.num_decoder_layers, c.moe_router) == (32, 24, 24, "balanced")
    report = footprint(c, {"expert": 32}, optimizer="none")
    assert abs(report["total"] - 198e9) / 198e9 < 0.01, report["total"]
    experts = report["breakdown"]["encoder/experts"] + report["breakdown"]["decoder/experts"]
    assert experts == 48 * 32 * (3 * 4096 * 10240 + 4096)
    # With 32-way expert parallelism a device holds 1/32 of every expert weight.
    assert report["per_device_bytes"]["params"] < report["total"] * 4 / 16


def test_small_moe_sizes_exist():
    assert get_config("cpm2_moe_tiny").num_experts == 4
    assert get_config("cpm2_moe_small").num_experts == 8


def test_gin_files_match_registered_sizes():
    import gin

    from cpm2_jax.gin_utils import model_config, parse_gin

    for name in ("cpm2_moe_198b", "cpm2_moe_small", "cpm2_moe_tiny"):
        parse_gin([f"models/{name}.gin"])
        try:
            assert model_config() == get_config(name), name
        finally:
            gin.clear_config()
