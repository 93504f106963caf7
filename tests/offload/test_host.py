"""Host compute of one expert (numpy, from its packed host buffer) and the device's
`split_moe.expert_apply` on the same weights, each against the float64 computation: float
and int8 buffers, gated GELU with the expert's norm scale and the Switch-style ReLU expert;
the GELU against jax.nn.gelu."""
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.model.feedforward import gelu as device_gelu
from cpm2_jax.offload import host as H
from cpm2_jax.offload import split_moe
from cpm2_jax.offload.store import pack_expert, unpack


def _expert(activation: str, d: int = 24, f: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    names = ("wi_0", "wi_1") if activation == "gated_gelu" else ("wi",)
    weights = {n: rng.normal(0, 0.3, size=(d, f)).astype(np.float32) for n in names}
    weights["wo"] = rng.normal(0, 0.3, size=(f, d)).astype(np.float32)
    if activation == "gated_gelu":  # CPM-2's experts carry their RMSNorm scale
        weights["norm_scale"] = (1 + 0.5 * rng.normal(size=(d,))).astype(np.float32)
    return weights


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("activation", ["gated_gelu", "relu"])
def test_host_expert_equals_the_device_expert(activation, int8):
    weights = _expert(activation)
    buf, layout = pack_expert(weights, int8=int8)
    rows = np.random.default_rng(1).normal(size=(5, 24)).astype(np.float32)
    # The device path on the weights the device would hold: int8 dequantised (w = q * s).
    device = np.asarray(split_moe.expert_apply(jnp.asarray(rows), unpack(jnp.asarray(buf), layout),
                                               activation=activation, dtype=jnp.float32))
    got = H.expert_rows(rows, H.host_weights(buf, layout), activation)
    assert got.dtype == np.float32 and got.shape == rows.shape
    # Both float32 paths within 1e-6 of the largest output from the float64 computation of the
    # same weights (summation orders differ: numpy's BLAS against XLA's).
    exact = H.expert_rows(rows.astype(np.float64), H.host_weights(buf, layout), activation)
    scale = np.abs(exact).max()
    assert scale > 0.1
    for path in (got, device):
        np.testing.assert_allclose(path, exact, rtol=0, atol=1e-6 * scale)
    if not int8:  # float weights: the host reads them in place (views of the buffer)
        assert all(np.shares_memory(m, buf) for m, _ in H.host_weights(buf, layout).values())


def test_gelu_equals_the_models():
    x = np.linspace(-8, 8, 1001, dtype=np.float32)
    np.testing.assert_allclose(H.gelu(x), np.asarray(device_gelu(jnp.asarray(x))), rtol=1e-6, atol=1e-6)
