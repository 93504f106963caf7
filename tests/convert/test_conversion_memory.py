"""`cpm2 convert from-cpm2` streams: the peak memory of importing a release is the model once
plus one shard, never a second copy of the model (issue 15: "importing the 11B model never
holds it twice in memory").

Measured in a child process on release shards of a `base`-size model (279M parameters, 4
model-parallel ranks: 0.56 GB of fp16 shards, 1.1 GB of float32 parameters). Why this size
bounds the 11B: the importer preallocates the float32 tree (the model once), then maps one
shard at a time and copies it tensor by tensor; the save fingerprints and writes the arrays
where they lie. Memory above the model is therefore one shard (fp16: 1/(2 mp) of the float32
model, 1/8 at mp 4 whatever the size) plus one tensor's temporaries (the largest, the 52,736-row
embedding or output matrix, is a larger fraction of `base` (15 %) than of the 11B (4 %)), so
the ratio measured here is an upper bound for the 11B's at the same mp.
The child first converts a tiny release (imports, compilations, thread pools), then the base
one; the bound is on the growth of its peak resident set (VmHWM, file pages of the mapped
shards included) over its resident set before the base conversion.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cpm2_jax.config import get_config  # noqa: E402
from cpm2_jax.convert.cpm2_release import TRACKER, local_shape, release_table  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB = REPO.parent / "shared" / "data" / "cpm2_vocab" / "bilingual_vocab.txt"
pytestmark = pytest.mark.skipif(not VOCAB.is_file(), reason="the released vocabulary is not present")

MP = 4
# Peak resident growth over the float32 model's bytes: the model once, one fp16 shard (1/8),
# one tensor's temporaries; a second copy anywhere (reading, fingerprints, save) would be >= 2.
BOUND = 1.3


def model_bytes(config) -> int:
    """Bytes of the float32 parameters: every tensor of the release once (mp 1, aliases aside)."""
    return 4 * sum(int(np.prod(local_shape(t, config, 1))) for t in release_table(config) if t.kind != "alias")


def write_release(root: pathlib.Path, config, mp: int) -> pathlib.Path:
    """Shards in the release's layout (names, per-rank shapes, fp16, DeepSpeed record); the
    values are slices of one random block (their values do not change the memory)."""
    (root / "1").mkdir(parents=True)
    (root / TRACKER).write_text("1")
    table = release_table(config)
    largest = max(int(np.prod(local_shape(t, config, mp))) for t in table)
    block = torch.randn(largest, generator=torch.Generator().manual_seed(0)).half()
    for rank in range(mp):
        state = {}
        for t in table:
            shape = local_shape(t, config, mp)
            state[t.key] = state["word_embeds.weight"] if t.kind == "alias" else \
                block[:int(np.prod(shape))].reshape(shape).clone()
        torch.save({"module": state, "mp_world_size": mp, "iteration": 1},
                   root / "1" / f"mp_rank_{rank:02d}_model_states.pt")
        del state
    return root


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(warm: str, release: str, vocab: str, out: str) -> None:
    """(In the child.) Converts `warm`, then `release`; prints the resident set before the
    second conversion and the process's peak after it."""
    from cpm2_jax import cli

    assert cli.main(["convert", "from-cpm2", warm, vocab, out + "_warm"]) == 0
    before = _status("VmRSS")
    assert cli.main(["convert", "from-cpm2", release, vocab, out]) == 0
    print(json.dumps({"before": before, "peak": _status("VmHWM")}))


def test_importing_a_base_release_holds_the_model_once(tmp_path):
    config = get_config("base")
    warm = write_release(tmp_path / "warm", get_config("tiny", vocab_size=52736), MP)
    release = write_release(tmp_path / "base", config, MP)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    code = "import sys; from tests.convert.test_conversion_memory import measure; measure(*sys.argv[1:])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(warm), str(release), str(VOCAB),
                               str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "out" / "state").is_dir()
    finally:  # 1.7 GB of shards and output: not left for pytest's kept temp directories
        for folder in (release, tmp_path / "out"):
            shutil.rmtree(folder, ignore_errors=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (rss["peak"] - rss["before"]) / model_bytes(config)
    print(f"peak resident growth {growth:.2f} x the float32 model ({model_bytes(config) / 2**30:.2f} GiB)")
    assert growth <= BOUND, rss


def test_host_fingerprints_are_the_device_fingerprints():
    """Fingerprints of host arrays (summed in place) equal the device reduction's, so the
    fingerprints recorded in existing checkpoints still verify; non-contiguous views included."""
    import jax
    import ml_dtypes

    from cpm2_jax.checkpoints import integrity

    rng = np.random.default_rng(0)
    base = rng.standard_normal((33, 17)).astype(np.float32) * 1e3
    host = {"f32": base, "f16": base.astype(np.float16), "bf16": base.astype(ml_dtypes.bfloat16),
            "i8": base.astype(np.int8), "i32": base.astype(np.int32), "u8": base.astype(np.uint8),
            "bool": base > 0, "view": base.T[::2], "scalar": np.float32(-3.5).reshape(())}
    found = integrity.fingerprints(host)
    assert set(found) == set(host)
    for name, x in host.items():
        assert found[name] == int(jax.jit(integrity._device_fingerprint)(x)), name
        assert found[name] == integrity.fingerprints({name: jax.numpy.asarray(x)})[name], name
