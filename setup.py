"""Package discovery only (all metadata is in pyproject.toml).

`tasks/` and `kernels/` are installed as `cpm2_jax.tasks` and `cpm2_jax.kernels`; their
sub-packages are found here so that new folders need no edit to a hand-written list.
"""
from setuptools import find_packages, setup

_MAPPED = {"cpm2_jax.tasks": "tasks", "cpm2_jax.kernels": "kernels"}

packages = find_packages(include=["cpm2_jax", "cpm2_jax.*"])
for name, folder in _MAPPED.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages)
