"""`cpm2 doctor`: one run of the command (as CI runs it), its figures checked against counts by
hand from the paper's dimensions, and the path checks on a gin file naming a missing path."""
import contextlib
import io
import json
import pathlib

import jax
import pytest

from cpm2_jax import cli
from cpm2_jax.commands import doctor

D, F, V, LAYERS = 4096, 10240, 52736, 24
ATTENTION, FFN = 4 * D * D, 3 * D * F  # q, k, v, o; wi_0, wi_1, wo
RELPOS = 64 * 32  # heads x buckets, once per stack
ENCODER = LAYERS * (ATTENTION + FFN + 2 * D) + RELPOS + D
DECODER = LAYERS * (2 * ATTENTION + FFN + 3 * D) + RELPOS + D
EXPERT = FFN + D  # an expert's matrices and its own RMSNorm scale


@pytest.fixture(scope="module")
def report():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(["doctor", "--json"]) == 0
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_backend_devices_and_versions(report):
    assert report["backend"] == jax.default_backend()
    assert report["device_count"] == jax.device_count() == len(report["devices"])
    first = report["devices"][0]
    assert first["default_memory_kind"] in first["memory_kinds"] and first["memory_bytes"] > 0
    assert report["versions"]["jax"] == jax.__version__
    assert report["versions"]["cpm2-jax"] is not None


def test_paths_and_gin_files(report):
    by_name = {p["name"]: p for p in report["paths"]}
    data = by_name["data_dir"]
    assert data["exists"] == pathlib.Path(data["path"]).is_dir()
    assert "vocabulary" in by_name and "cache_dir" in by_name
    assert "models/cpm2_11b.gin" in report["gin"]["files"] and "runs/pretrain.gin" in report["gin"]["files"]
    assert report["gin"]["gin_dir"] in report["gin"]["search_paths"]


def test_model_needs_match_counts_by_hand(report):
    dense = report["models"]["cpm2_11b"]
    assert dense["parameters"] == 2 * V * D + ENCODER + DECODER == 11_304_153_088
    devices = report["device_count"]
    sharded = dense["sharded"]
    # bf16 inference holds half the float32 parameter bytes; training at least params + 2 AdamW moments
    assert sharded["train_bytes"] >= 3 * 4 * dense["parameters"] // devices
    assert sharded["train_fits"] == (sharded["train_bytes"] <= dense["device_bytes"])
    assert dense["offloaded"] is None

    moe = report["models"]["cpm2_moe_198b"]
    experts = 2 * LAYERS * 32 * EXPERT
    assert moe["parameters"] == 198_550_269_952
    assert moe["mesh"].get("expert", 1) * moe["mesh"]["model"] == devices
    off = moe["offloaded"]
    assert off["expert_bytes"] == 2 * EXPERT  # bfloat16
    routers = 2 * LAYERS * D * 32  # centroids, kept in float32 whatever the parameter dtype
    assert off["resident_bytes"] == 2 * (moe["parameters"] - experts - routers) + 4 * routers
    assert off["bytes_per_step"] == LAYERS * off["expert_bytes"]  # top-1, every decoder layer MoE
    room = int(0.9 * moe["device_bytes"] - off["resident_bytes"]) // off["expert_bytes"]
    assert off["largest_k"] == max(0, min(32, room))


def test_table_names_every_section(report):
    table = doctor.format_table(report)
    for word in ("backend", "devices", "versions", "paths", "gin files", "cpm2_11b", "cpm2_moe_198b", "offloaded"):
        assert word in table


def test_gin_file_naming_a_missing_path(tmp_path):
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(f"cpm2_jax.tasks.settings.configure.data_dir = '{tmp_path / 'absent'}'\n"
                        f"VOCABULARY = '{gin_file}'\nTRAIN_STEPS = 10\n")
    found = {e["name"]: e for e in doctor.gin_path_bindings([gin_file])}
    assert set(found) == {"cpm2_jax.tasks.settings.configure.data_dir", "VOCABULARY"}
    assert not found["cpm2_jax.tasks.settings.configure.data_dir"]["exists"]
    assert found["VOCABULARY"]["exists"]
    missing = doctor.paths_report(["no_such_file.gin"])["paths"]
    assert any(e["name"] == "no_such_file.gin" and "not found" in e["error"] for e in missing)


def test_suggested_size_follows_tiny_mode_and_backend(monkeypatch):
    from cpm2_jax.config import get_config

    monkeypatch.setenv(doctor.TINY_ENV, "1")
    assert doctor.tiny_mode() and (doctor.suggested_size(), doctor.suggested_size("moe")) == ("tiny", "cpm2_moe_tiny")
    monkeypatch.setenv(doctor.TINY_ENV, "0")
    dense, moe = doctor.SIZE_FOR_BACKEND[jax.default_backend()]
    assert not doctor.tiny_mode() and doctor.suggested_size("moe") == moe
    assert get_config(doctor.suggested_size()).num_experts == 0 and get_config(moe).num_experts > 0
    with pytest.raises(ValueError):
        doctor.suggested_size("sparse")
