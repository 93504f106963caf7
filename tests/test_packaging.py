"""The wheel: it holds every gin file, and an installed (non-editable) copy finds them."""
import os
import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_holds_the_gin_files_and_the_installed_package_finds_them(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cpm2_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cpm2_jax/gin/{p.relative_to(REPO / 'gin').as_posix()}" for p in (REPO / "gin").rglob("*.gin")}
    assert expected and expected <= names, sorted(expected - names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    probe = ("import cpm2_jax, sys; from cpm2_jax import gin_utils; "
             "gin_utils.parse_gin(['models/cpm2_moe_tiny.gin']); c = gin_utils.model_config(); "
             "print(cpm2_jax.__file__, gin_utils.GIN_DIR, c.num_experts, c.d_model, sep='|')")
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    module, gin_dir, experts, d_model = out.split("|")
    assert module.startswith(str(site)) and gin_dir == str(site / "cpm2_jax" / "gin")
    assert (experts, d_model) == ("4", "64")  # models/cpm2_moe_tiny.gin and the files it includes
