"""The MoE block: every backend gives the same outputs and gradients; expert parallelism on
8 fake CPU devices (data=2, expert=4) equals one device with expert weights sharded; diagnostics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpm2_jax.config import get_config
from cpm2_jax.errors import ConfigError, ShardingError
from cpm2_jax.moe.layer import MoeBlock, routing_groups
from cpm2_jax.partitioning import cpu_test_mesh, init_sharded, mesh_context, rules_for_mesh

BACKENDS = ("ragged_dot", "padded", "einsum")
CASES = [("balanced", 1, 1.0), ("top_k", 1, 4.0), ("top_k", 2, 2.0), ("experts_choose", 1, 1.0)]


def config(router="balanced", k=1, cf=1.0, **kw):
    # init_std 0.05 so outputs and gradients are far from zero.
    return get_config("cpm2_moe_tiny", moe_router=router, moe_top_k=k, moe_capacity_factor=cf, init_std=0.05, **kw)


def loss_and_grads(c, params, x, deterministic=False):
    def loss(p, x):
        y = MoeBlock(config=c, deterministic=deterministic).apply({"params": p}, x)
        return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape))), y

    (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


@pytest.mark.parametrize("router,k,cf", CASES)
def test_backends_agree_on_outputs_and_gradients(router, k, cf):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    c = config(router, k, cf)
    params = nn.unbox(MoeBlock(config=c).init(jax.random.PRNGKey(1), x))["params"]
    results = {b: loss_and_grads(c.replace(moe_backend=b), params, x) for b in BACKENDS}
    y_ref, g_ref = results["einsum"]
    assert float(jnp.abs(y_ref).max()) > 1e-3
    for backend, (y, grads) in results.items():
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-6, err_msg=backend)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=backend)


def test_pallas_with_experts_choose_routing_and_the_fused_ffn():
    """Experts-choose routing has no fixed k per token: with backend pallas its dispatch keeps
    jnp.take and the segment-sum combine (no permutation kernels), while the experts run as the
    fused gated-GELU kernels (interpret mode on CPU); outputs and gradients equal ragged_dot's."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    c = config("experts_choose", 1, 1.0, moe_fused_ffn=True)
    params = nn.unbox(MoeBlock(config=c).init(jax.random.PRNGKey(1), x))["params"]
    y_ref, g_ref = loss_and_grads(c.replace(moe_backend="ragged_dot"), params, x)
    y, grads = loss_and_grads(c.replace(moe_backend="pallas"), params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cpu_expert_loop_equals_the_batched_dot(monkeypatch, dropout):
    """The per-expert loop (CPU, experts on one device; the whole block when there is no
    dropout, per product otherwise) against the batched dot used under an expert mesh.
    The loop sees routed rows only, so one router (top-2) serves; the balanced router's rows
    go through the loop in test_backends_agree_on_outputs_and_gradients (padded, einsum)."""
    router, k, cf = "top_k", 2, 2.0
    import cpm2_jax.moe.layer as layer

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    c = config(router, k, cf, moe_backend="padded", dropout_rate=dropout)
    params = nn.unbox(MoeBlock(config=c).init(jax.random.PRNGKey(1), x))["params"]
    rngs = {"dropout": jax.random.PRNGKey(5)}

    def run(loop):
        monkeypatch.setattr(layer, "use_expert_loop", lambda: loop)

        def loss(p, x):
            y = MoeBlock(config=c, deterministic=False).apply({"params": p}, x, rngs=rngs)
            return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape))), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, y_loop), g_loop = run(True)
    (_, y_dot), g_dot = run(False)
    np.testing.assert_allclose(np.asarray(y_loop), np.asarray(y_dot), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_dot)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_matches_a_per_token_reference():
    """Top-2 with no drops: y_s = sum_k w_k Expert_k(x_s), Expert = RMSNorm(s_e) + gated GELU."""
    from cpm2_jax.model.feedforward import gated_gelu
    from cpm2_jax.model.norm import rms_norm
    from cpm2_jax.moe.routing import Router

    x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 64))
    c = config("top_k", 2, 4.0)
    variables = nn.unbox(jax.jit(MoeBlock(config=c).init)(jax.random.PRNGKey(3), x))
    p = variables["params"]
    ex = jax.tree.map(lambda a: a * (1 + 0.1 * jnp.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))),
                      p["experts"])  # make the experts differ
    p = {**p, "experts": ex}
    y = jax.jit(MoeBlock(config=c, deterministic=True).apply)({"params": p}, x)
    normed = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + c.layer_norm_epsilon)
    r = jax.jit(Router(config=c).apply)({"params": p["router"]}, normed)
    assert bool(r.kept.all())
    expected = np.zeros((8, 64), np.float32)
    expert = jax.jit(lambda h, s, w0, w1, wo: gated_gelu(rms_norm(h, s, c.layer_norm_epsilon), w0, w1, wo))
    for a in range(16):
        s, e, w = int(r.token[0, a]), int(r.expert[0, a]), float(r.weight[0, a])
        expected[s] += w * np.asarray(expert(x[0, s], ex["norm_scale"][e], ex["wi_0"][e], ex["wi_1"][e], ex["wo"][e]))
    np.testing.assert_allclose(np.asarray(y[0]), expected, rtol=1e-4, atol=1e-6)


def test_sown_diagnostics_and_aux_losses():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    c = config("top_k", 1, 0.5)

    def sown(c):  # one jitted program per router instead of op-by-op dispatch
        params = jax.jit(MoeBlock(config=c).init)(jax.random.PRNGKey(1), x)["params"]
        return jax.jit(lambda p, x: MoeBlock(config=c, deterministic=False).apply(
            {"params": p}, x, mutable=["intermediates", "aux_loss"]))(params, x)[1]

    state = sown(c)
    inter = state["intermediates"]
    assert inter["expert_load"][0].shape == (4,)
    assert float(inter["fraction_dropped"][0]) > 0  # capacity 2 of 16 tokens per expert
    assert 0 < float(inter["router_entropy"][0]) <= np.log(4) + 1e-6
    losses = state["aux_loss"]
    assert float(losses["load_balancing_loss"][0]) == pytest.approx(0.01 * 1.0, rel=0.5)
    assert "router_z_loss" in losses
    state = sown(config())
    assert "aux_loss" not in state or not state["aux_loss"]  # balanced: no auxiliary loss
    assert float(state["intermediates"]["fraction_dropped"][0]) == 0.0


def test_routing_groups():
    assert routing_groups(4, 16, 0) == (4, 16)
    assert routing_groups(4, 16, 32) == (2, 32)
    assert routing_groups(3, 1, 32) == (3, 1)  # decoding steps: one group per sequence


# ragged_dot without the shuffle adds nothing over it with the shuffle (padded covers both).
@pytest.mark.parametrize("backend,shuffled", [("padded", False), ("einsum", False), ("padded", True),
                                              ("ragged_dot", True)])
def test_expert_parallel_equals_single_device(backend, shuffled):
    """With `shuffled`, a dropout rng turns on BASE's token shuffle: its exchange of tokens
    between the batch shards is then part of what must equal the single-device result."""
    mesh = cpu_test_mesh(data=2, model=1, expert=4)
    c = config("balanced", moe_backend=backend, num_experts=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 64))
    module = MoeBlock(config=c, deterministic=False)
    variables, shardings = init_sharded(module, jax.random.PRNGKey(1), x, mesh=mesh)
    wi_0 = variables["params"]["experts"]["wi_0"]
    assert shardings["params"]["experts"]["wi_0"].spec == P("expert", None, None)
    assert {s.data.shape for s in wi_0.addressable_shards} == {(2, 64, 128)}  # 8 experts / 4 devices
    rngs = {"dropout": jax.random.PRNGKey(3)} if shuffled else None
    apply = jax.jit(lambda v, x: module.apply(v, x, rngs=rngs))
    single = apply(jax.device_get(variables), jax.device_get(x))
    with mesh_context(mesh), nn.logical_axis_rules(rules_for_mesh(mesh.axis_names)):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "expert"))))
        sharded = apply(variables, xs)
        if backend == "padded":  # tokens reach their experts' devices by XLA's all-to-all
            assert "all-to-all" in apply.lower(variables, xs).compile().as_text()
    if shuffled:
        unshuffled = jax.jit(module.apply)(jax.device_get(variables), jax.device_get(x))
        assert float(jnp.max(jnp.abs(unshuffled - single))) > 1e-5
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-6)


def test_experts_not_divisible_by_expert_axis():
    mesh = cpu_test_mesh(data=2, model=1, expert=4)
    c = config("top_k", num_experts=6)
    x = jnp.zeros((8, 12, 64))
    with pytest.raises(ShardingError, match=r"experts/\w+ has shape \(6, .*expert of size 4"):
        init_sharded(MoeBlock(config=c), jax.random.PRNGKey(0), x, mesh=mesh)


def test_balanced_group_not_divisible_by_experts():
    with pytest.raises(ConfigError, match="multiple of the number of experts"):
        MoeBlock(config=config(), deterministic=False).init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 64)))
