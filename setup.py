"""Package discovery only (all metadata is in pyproject.toml).

`tasks/` and `kernels/` are installed as `cpm2_jax.tasks` and `cpm2_jax.kernels`; their
sub-packages are found here so that new folders need no edit to a hand-written list.
`gin/` is installed as `cpm2_jax.gin` (and its folders as its sub-packages): packages of
`.gin` data files only, so that a wheel install finds the model and run files.
"""
from setuptools import find_namespace_packages, find_packages, setup

_MAPPED = {"cpm2_jax.tasks": "tasks", "cpm2_jax.kernels": "kernels"}

packages = find_packages(include=["cpm2_jax", "cpm2_jax.*"])
for name, folder in _MAPPED.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

gin_packages = ["cpm2_jax.gin"] + [f"cpm2_jax.gin.{sub}" for sub in find_namespace_packages(where="gin")]
packages += gin_packages

setup(packages=packages, package_data={name: ["*.gin"] for name in gin_packages})
