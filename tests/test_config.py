"""Named sizes, config validation and the gin size files (which must agree with SIZES)."""
import pytest

from cpm2_jax.config import SIZES, ModelConfig, get_config
from cpm2_jax.errors import ConfigError, check_choice
from cpm2_jax.gin_utils import GIN_DIR, model_config, parse_gin


def test_cpm2_11b_figures():
    c = get_config("cpm2_11b")
    assert (c.num_encoder_layers, c.num_decoder_layers) == (24, 24)
    assert (c.d_model, c.d_ff, c.num_heads, c.head_dim) == (4096, 10240, 64, 64)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.vocab_size == 52736 and get_config("cpm2_11b_zh").vocab_size == 26240
    assert c.layer_norm_epsilon == 1e-6 and c.init_std == 0.001 and c.dropout_rate == 0.0


def test_mt5_shapes():
    s, b = get_config("small"), get_config("base")
    assert (s.num_encoder_layers, s.d_model, s.d_ff, s.num_heads, s.head_dim) == (8, 512, 1024, 6, 64)
    assert (b.num_encoder_layers, b.d_model, b.d_ff, b.num_heads, b.head_dim) == (12, 768, 2048, 12, 64)


def test_unknown_size_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown model size 'cpm2_11' \(did you mean 'cpm2_11b'"):
        get_config("cpm2_11")


def test_check_choice_names_the_setting_the_choices_and_a_near_miss():
    check_choice("--cache", "lru", ("lru", "lfu", "none"))  # allowed: nothing raised
    with pytest.raises(ConfigError, match=r"^--cache must be one of lru, lfu, none, got 'lfy' \(did you mean 'lfu'\?\)$"):
        check_choice("--cache", "lfy", ("lru", "lfu", "none"))
    with pytest.raises(ValueError, match=r"^k must be one of 1, 2, got 3$") as raised:
        check_choice("k", 3, (1, 2), ValueError)
    assert type(raised.value) is ValueError


def test_unknown_field_and_bad_values():
    with pytest.raises(ConfigError, match="no field 'd_modle'.*d_model"):
        get_config("tiny", d_modle=3)
    with pytest.raises(ConfigError, match="num_heads must be positive"):
        ModelConfig(num_heads=0)
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="float8")


@pytest.mark.parametrize("name", ["tiny", "small", "base", "cpm2_11b", "cpm2_11b_zh"])
def test_gin_size_file_matches_named_size(name):
    parse_gin([f"models/{name}.gin"])
    try:
        assert model_config() == SIZES[name]
    finally:
        import gin

        gin.clear_config()


def test_gin_size_files_only_override_dimensions():
    allowed = {"vocab_size", "d_model", "d_ff", "num_heads", "head_dim", "num_encoder_layers",
               "num_decoder_layers", "num_experts"}
    for path in (GIN_DIR / "models").glob("*.gin"):
        if path.name == "cpm2.gin" or path.name.startswith("cpm2_moe"):
            continue
        for line in path.read_text().splitlines():
            if line.startswith("cpm2_jax.model_config."):
                field = line.split(".")[2].split("=")[0].strip()
                assert field in allowed, f"{path.name} overrides {field}, not a dimension"
