"""Host compute of a cold expert (InfMoE's CPU fallback; Fiddler, Kamahori et al. 2024): its
few tokens run on the host's CPU, reading the packed buffer where it lies in host memory, so
only its rows and its output cross the link, never its weights. Worth it when the host's time
for n tokens is below one load: for a decoding step's one token a matrix-vector product reads
the weights once at host-memory speed, where a load moves them at link speed.

    x' = x * norm_scale                               (the expert's RMSNorm scale, if it has one)
    y  = wo( gelu(x' wi_0) * (x' wi_1) )              (gated GELU; relu(x' wi) wo for ReLU)
    int8 weights: x (q * s) = (x q) * s               (s per column: scales the product's
                                                       columns; q read as stored, never scaled)

The same function of the same weights as the device's `split_moe.expert_apply` (float32
summation order aside: within 1e-6, tests/offload/test_host.py), so where an expert runs
changes timing only.

Why numpy and not JAX's CPU backend: numpy runs in the calling thread, on the host's cores.
Where the accelerator is itself the CPU (the paced link model of the benchmarks) the CPU
backend's thread pool *is* the device's, so a JAX host computation would run on the device's
cores; numpy runs beside it, as a host CPU beside an accelerator does. Always float32 (the
host has no bfloat16 matmul).
"""
from __future__ import annotations

import numpy as np

from cpm2_jax.offload.store import Layout, numpy_entries

_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def gelu(x: np.ndarray) -> np.ndarray:
    """tanh-approximated GELU, as `model.feedforward.gelu` (jax.nn.gelu(approximate=True))."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def host_weights(buffer, layout: Layout) -> dict:
    """{name: (matrix, column scale or None)} of one packed expert, views of its host buffer."""
    raw = numpy_entries(buffer, layout)
    return {e.name: (raw[e.name], raw[e.scale] if e.scale else None)
            for e in layout.entries if not e.name.endswith("/scale")}


def _matmul(x: np.ndarray, weight) -> np.ndarray:
    matrix, scale = weight
    y = x @ matrix.astype(x.dtype, copy=False)
    return y if scale is None else y * scale.astype(x.dtype, copy=False)


def expert_rows(rows: np.ndarray, weights: dict, activation: str) -> np.ndarray:
    """One expert on its rows [n, d] from `host_weights`: [n, d] in float32 (float64 rows: in
    float64, the tests' reference)."""
    rows = np.asarray(rows)
    x = rows.astype(np.float64 if rows.dtype == np.float64 else np.float32, copy=False)
    if "norm_scale" in weights:
        x = x * weights["norm_scale"][0].astype(x.dtype, copy=False)
    if activation == "gated_gelu":
        h = gelu(_matmul(x, weights["wi_0"])) * _matmul(x, weights["wi_1"])
    else:
        h = np.maximum(_matmul(x, weights["wi"]), 0.0)
    return _matmul(h, weights["wo"])
