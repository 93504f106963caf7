"""Projections' weight-gradient VJP choice (ModelConfig.cpu_weight_grads): the hand-written
`weight_grad` path and plain autodiff give the same gradients; "auto" follows the platform."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.errors import ConfigError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.model import dense
from cpm2_jax.model.feedforward import gated_gelu

ENC = jnp.array([[5, 6, 7, 8, 1, 0], [9, 10, 11, 12, 13, 1]])
DEC = jnp.array([[0, 5, 6, 7], [0, 3, 4, 5]])


def _loss_and_grads(setting):
    config = get_config("tiny", init_std=0.3, num_encoder_layers=1, num_decoder_layers=1, cpu_weight_grads=setting)
    model = EncoderDecoder(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ENC, DEC))["params"]

    def loss(p):
        logits = model.apply({"params": p}, ENC, DEC)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, DEC[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(loss)(params)


def test_hand_written_and_autodiff_weight_grads_agree():
    (loss_on, grads_on), jaxpr_on = _loss_and_grads("on")
    (loss_off, grads_off), jaxpr_off = _loss_and_grads("off")
    # Two real paths: the hand-written weight-gradient VJPs (`linear`, `_gated_gelu_2d`) only with
    # "on" (RMSNorm, the GELU gate and the softmax have custom VJPs of their own on both paths).
    weight_vjps = lambda jaxpr: set(re.findall(r"custom_vjp_call\[[^\]]*?name=(linear|_gated_gelu_2d)\b",  # noqa: E731
                                               str(jaxpr), re.S))
    assert weight_vjps(jaxpr_on) == {"linear", "_gated_gelu_2d"} and not weight_vjps(jaxpr_off)
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    flat_on, flat_off = jax.tree_util.tree_leaves_with_path(grads_on), jax.tree_util.tree_leaves(grads_off)
    assert len(flat_on) == len(flat_off)
    for (path, a), b in zip(flat_on, flat_off):
        assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(jnp.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_gated_gelu_grads_agree_across_paths():
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(6, 8), (8, 16), (8, 16), (16, 8)]]
    grad = {s: jax.grad(lambda *a, s=s: jnp.sum(jnp.sin(gated_gelu(*a, cpu_weight_grads=s))), argnums=(0, 1, 2, 3))
            for s in ("on", "off")}
    for a, b in zip(grad["on"](*args), grad["off"](*args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_auto_follows_the_default_backend(monkeypatch):
    assert dense.use_cpu_weight_grads("on") and not dense.use_cpu_weight_grads("off")
    for backend, expected in (("cpu", True), ("gpu", False), ("tpu", False)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert dense.use_cpu_weight_grads("auto") is expected


def test_unknown_setting_is_rejected():
    with pytest.raises(ConfigError, match="cpu_weight_grads"):
        get_config("tiny", cpu_weight_grads="yes")
    with pytest.raises(ValueError, match="cpu_weight_grads"):
        dense.use_cpu_weight_grads("maybe")
