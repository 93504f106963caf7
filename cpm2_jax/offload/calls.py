"""The jitted calls the offload runner issues per expert (and its calibration times): an
expert computed from the weights its slot holds, a host-computed expert's output added on the
device, an int8 expert's dequantisation on arrival."""
from __future__ import annotations

import functools

import jax

from cpm2_jax.config import dtype_of
from cpm2_jax.offload import split_moe, store


@functools.partial(jax.jit, static_argnames=("tile", "activation", "dtype"), donate_argnums=(0,))
def slot_step(out, rows, offset, count, weights, *, tile: int, activation: str, dtype: str):
    """One expert from the weights its slot holds; returns the updated output and a scalar that
    is ready when the computation is done."""
    out = split_moe.add_expert_output(out, rows, offset, count, weights, tile=tile, activation=activation,
                                      dtype=dtype_of(dtype))
    return out, out[0, 0]


add_rows = jax.jit(split_moe.add_rows, donate_argnums=(0,))  # a host-computed expert's output, on the device


@functools.partial(jax.jit, static_argnames=("layout", "dtype"))
def dequantise(buffer, *, layout: store.Layout, dtype: str):
    """An int8 expert's float weights, and a flag ready with them (the release thread waits on
    the flag: the weights may be evicted, and deleted, before it looks)."""
    return store.dequantise(buffer, layout, dtype), buffer[0]
