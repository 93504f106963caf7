"""`cpm2 offload`: decodes like decoding.py and reports; --plan for a checkpoint and for the
198B config (no allocation); bad input is one line and exit status 2."""
import json

import numpy as np
import pytest

from cpm2_jax import cli, decoding
from cpm2_jax.convert import native
from tests.offload.models import tiny


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    c, params = tiny(moe=True)
    path = tmp_path_factory.mktemp("moe") / "ckpt"
    native.save_params(params, c, path)
    return str(path), c, params


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_offload_decodes_like_decoding_and_reports(moe_checkpoint, capsys, tmp_path):
    path, c, params = moe_checkpoint
    inputs = tmp_path / "in.txt"
    inputs.write_text("5 9 17 33 2\n\n{\"inputs\": [40, 41, 42]}\n")
    png = tmp_path / "timeline.png"
    code, out, err = run(["offload", "--checkpoint", path, "--device_experts", "2", "--input", str(inputs),
                          "--max_new_tokens", "5", "--prefetch", "--timeline", str(png)], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    report = lines[-1]["report"]
    for rec in lines[:-1]:
        ref = decoding.greedy(params, np.asarray([rec["inputs"]], np.int32), config=c, max_new_tokens=5)
        n = int(ref.lengths[0])
        assert rec["outputs"] == np.asarray(ref.tokens)[0, :n].tolist()
    assert len(lines) == 3
    assert report["peak_device_experts"] <= 2 and report["bytes_moved"] == report["loads"] * report["expert_bytes"]
    assert 0 <= report["cache_hit_rate"] <= 1 and report["tokens_per_s"] > 0
    assert 0 <= report["prefetch_guess_precision"] <= 1 and report["fills"] == 0  # no host compute: no fills
    assert png.stat().st_size > 1000


def test_plan_for_a_checkpoint_and_for_198b(moe_checkpoint, capsys):
    path, c, _ = moe_checkpoint
    code, out, err = run(["offload", "--plan", "--checkpoint", path, "--bandwidth_gbps", "10"], capsys)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan["largest_k"] == c.num_experts and plan["decoder_moe_layers"] == 2
    d, f = c.d_model, c.d_ff
    assert plan["expert_bytes"] == (3 * d * f + d) * 4
    code, out, err = run(["offload", "--plan", "--gin_file", "gin/models/cpm2_moe_198b.gin", "--device_memory_gib", "141",
                          "--bandwidth_gbps", "55"], capsys)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan["num_experts"] == 32 and plan["moe_layers"] == 48
    assert plan["expert_bytes"] == (3 * 4096 * 10240 + 4096) * 4  # float32 parameters
    assert 0 < plan["largest_k"] <= 32
    assert plan["bytes_per_step"] == 24 * plan["expert_bytes"]


@pytest.mark.parametrize("k,fit,needle", [("0", None, "between 1 and"), ("5", None, "between 1 and"),
                                           ("3", 2, "largest K that fits is 2")])
def test_bad_k_is_one_line(moe_checkpoint, capsys, tmp_path, k, fit, needle):
    path, _, _ = moe_checkpoint
    inputs = tmp_path / "in.txt"
    inputs.write_text("5 6\n")
    extra = []
    if fit:  # device memory for the resident weights and 2.5 experts
        _, out, _ = run(["offload", "--plan", "--checkpoint", path, "--bandwidth_gbps", "1"], capsys)
        plan = json.loads(out)["plan"]
        gib = (plan["resident_bytes"] + (fit + 0.5) * plan["expert_bytes"]) / 0.9 / 2 ** 30
        extra = ["--device_memory_gib", repr(gib)]
    code, out, err = run(["offload", "--checkpoint", path, "--device_experts", k, "--input", str(inputs)] + extra,
                         capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_dense_checkpoint_is_one_line(tmp_path, capsys):
    c, params = tiny(moe=False)
    native.save_params(params, c, tmp_path / "dense")
    code, out, err = run(["offload", "--checkpoint", str(tmp_path / "dense"), "--device_experts", "1"], capsys)
    assert code == 2 and "dense" in err and len(err.strip().splitlines()) == 1, err


def test_bad_prefetch_precision_is_one_line(moe_checkpoint, capsys):
    path, _, _ = moe_checkpoint
    code, out, err = run(["offload", "--checkpoint", path, "--device_experts", "2", "--prefetch",
                          "--prefetch_precision", "2"], capsys)
    assert code == 2 and "--prefetch_precision must be between 0 and 1" in err and len(err.strip().splitlines()) == 1, err
