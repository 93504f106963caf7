"""`cpm2 convert from-hf` / `to-hf` through `cpm2_jax.cli.main`: round trip and one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from cpm2_jax.cli import main  # noqa: E402
from cpm2_jax.convert import load_params, read_hf_state_dict  # noqa: E402
from tests.convert.hf_models import TEST_CONFIG, numpy_state_dict, random_mt5  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = random_mt5(seed=1)
    directory = tmp_path_factory.mktemp("hf") / "mt5"
    model.save_pretrained(str(directory))
    return directory, numpy_state_dict(model)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_from_hf_then_to_hf_is_bit_exact(hf_dir, tmp_path, capsys, scan):
    source, state = hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    assert main(["convert", "from-hf", str(source), str(ckpt)] + (["--scan_layers"] if scan else [])) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["scan_layers"] is scan and report["parameters"] > 0
    params, config = load_params(ckpt)
    assert config == TEST_CONFIG.replace(scan_layers=scan)
    assert ("layers" in params["encoder"]) is scan

    assert main(["convert", "to-hf", str(ckpt), str(out)]) == 0
    written, hf_config = read_hf_state_dict(out)
    assert hf_config["d_kv"] == TEST_CONFIG.head_dim and hf_config["tie_word_embeddings"] is False
    expected = {k: v for k, v in state.items() if not k.endswith("embed_tokens.weight")}
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(written[key], value) and written[key].dtype == value.dtype, key


def test_bfloat16_checkpoint(hf_dir, tmp_path, capsys):
    source, state = hf_dir
    assert main(["convert", "from-hf", str(source), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    params, config = load_params(tmp_path / "ckpt")
    assert config.param_dtype == "bfloat16" and str(params["token_embedder"]["embedding"].dtype) == "bfloat16"
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    written, _ = read_hf_state_dict(tmp_path / "out")
    np.testing.assert_allclose(written["lm_head.weight"], state["lm_head.weight"], rtol=1e-2)


@pytest.mark.parametrize("argv, needle", [
    (["convert", "from-hf", "{tmp}/nowhere", "{tmp}/out"], "does not exist"),
    (["convert", "to-hf", "{tmp}/nowhere", "{tmp}/out"], "does not exist"),
    (["convert", "to-hf", "{tmp}/full", "{tmp}/out"], "no checkpoint found"),
    (["convert", "from-hf", "{src}", "{tmp}/full"], "not empty"),
    (["convert", "to-hf", "{tmp}/full", "{tmp}/out", "--max_shard_bytes", "0"], "--max_shard_bytes"),
])
def test_bad_arguments_give_one_line_and_exit_2(hf_dir, tmp_path, capsys, argv, needle):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, src=hf_dir[0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cpm2 convert: error:") and needle in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_wrong_shaped_hf_checkpoint_names_the_key(hf_dir, tmp_path, capsys):
    source, _ = hf_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((source / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "d_ff": 96}))
    (bad / "model.safetensors").symlink_to(source / "model.safetensors")
    assert main(["convert", "from-hf", str(bad), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight': expected shape (96, 64), found (128, 64)" in err
    assert not (tmp_path / "ckpt").exists()


def test_missing_conversion_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("argv,needle", [
    (["offload", "--device_experts", "2", "--prefetch_precison", "0.3"], "unrecognized arguments: --prefetch_precison"),
    (["offload", "--prefetch_precision", "abc"], "argument --prefetch_precision: invalid float value: 'abc'"),
    (["convert", "from-hf"], "the following arguments are required"),
])
def test_a_flag_error_is_one_line(argv, needle, capsys):
    """Any command's flag typo, unparsable value or missing argument: one line naming it, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
