"""`cpm2 params`: exact totals from eval_shape, bytes per device, and its CLI errors."""
import json
import subprocess
import sys

import pytest

from cpm2_jax.config import get_config
from cpm2_jax.errors import ShardingError
from cpm2_jax.footprint import footprint


def test_cpm2_11b_total_exact():
    c = get_config("cpm2_11b")
    r = footprint(c, {"data": 8, "model": 8}, "adamw")
    attn, ffn = 4 * 4096 * 4096, 3 * 4096 * 10240
    want = (2 * 52736 * 4096 + 2 * 64 * 32 + 24 * (attn + ffn + 2 * 4096) + 24 * (2 * attn + ffn + 3 * 4096) + 2 * 4096)
    assert r["total"] == want == 11_304_153_088
    assert sum(r["breakdown"].values()) == want
    # float32 params split 8 ways on `model` (embedding, heads, mlp, vocab all shard on it).
    small = sum(v for k, v in r["breakdown"].items() if "norm" in k)  # [embed]: replicated
    assert r["per_device_bytes"]["params"] == (want - small) * 4 // 8 + small * 4
    # AdamW keeps two float32 moments per parameter, sharded like it (+ a step counter).
    assert abs(r["per_device_bytes"]["optimizer_state"] - 2 * r["per_device_bytes"]["params"]) < 64


def test_chinese_stage_total():
    assert footprint(get_config("cpm2_11b_zh"), None, "none")["total"] == 11_087_097_856


def test_adafactor_state_is_factored():
    r = footprint(get_config("small"), {"data": 1}, "adafactor")
    assert r["per_device_bytes"]["optimizer_state"] < 0.2 * r["per_device_bytes"]["params"]


def test_indivisible_mesh_names_the_axis():
    with pytest.raises(ShardingError, match="heads|num_heads|axis 1 \\(size 6\\)"):
        footprint(get_config("small"), {"data": 1, "model": 4}, "none")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cpm2_jax.cli", *args], capture_output=True, text=True, timeout=300)


def test_params_cli_on_11b_gin_file():
    out = _cli("params", "--gin_file=gin/models/cpm2_11b.gin", "--mesh", "data=8,model=8")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 11.0e9 < report["total"] < 11.4e9 and report["mesh"] == {"data": 8, "model": 8}
    assert report["per_device_bytes"]["params"] > 0 and report["per_device_bytes"]["optimizer_state"] > 0


@pytest.mark.parametrize("args,needle", [
    (("params", "--size", "cpm2_11"), "unknown model size 'cpm2_11' (did you mean 'cpm2_11b'?)"),
    (("params", "--size", "small", "--mesh", "data=2,model=4"), "axis 1 (size 6) cannot be split over mesh axis model"),
    (("params", "--gin_file=gin/models/nope.gin"), "--gin_file 'gin/models/nope.gin' not found"),
])
def test_params_cli_errors_are_one_line(args, needle, capsys):
    # In-process `cpm2` (the entry point's main; the binary itself runs in the test above).
    from cpm2_jax import cli

    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
