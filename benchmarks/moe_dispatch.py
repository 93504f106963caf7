"""Forward + backward time of one whole MoE layer per grouped-matmul backend, vs a dense FFN.

    python benchmarks/moe_dispatch.py [--tokens 8192] [--repeats 3] [--backends ...]

The MoE layer is `cpm2_jax.moe.layer.MoeBlock` (router, dispatch, gated-GELU experts with
their norms, combine) with d_model 512, d_ff 1024, 32 experts, top-1 (Switch, capacity factor
1) and balanced (BASE / CPM-2) routing; the dense baseline is the pre-norm gated-GELU block
with the same d_ff (the same active FLOPs per token). All variants are compiled first, then
timed in interleaved rounds (each once per round; medians), as the 2-core machine is shared
and its load drifts. The dense FFN and the default backend share their rounds; every other
backend is timed in rounds of its own, after them: a step run right after an einsum or
ragged_dot step (seconds of large one-hot or looped buffers) was measured ~10% slower, which
would charge one backend for another's memory traffic. Prints one JSON object last and writes
benchmarks/results/moe_dispatch.json:
  speedup_vs_einsum = t(einsum) / t(default backend)      target >= 3
  overhead_vs_dense = t(default backend) / t(dense FFN)   target <= 1.3
(top level: the worse of the two routings; per routing under "routings").
"""
from __future__ import annotations

import argparse
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import ModelConfig
from cpm2_jax.model.feedforward import MlpBlock
from cpm2_jax.model.norm import RMSNorm
from cpm2_jax.moe.grouped_matmul import select_backend
from cpm2_jax.moe.layer import MoeBlock
from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)
from timing import timed_interleaved  # noqa: E402  (benchmarks/timing.py)

RESULTS = RESULTS_DIR / "moe_dispatch.json"
ROUTINGS = {"top_1": dict(moe_router="top_k", moe_top_k=1, moe_capacity_factor=1.0),
            "balanced": dict(moe_router="balanced")}


class DenseFFN(nn.Module):
    """The dense pre-norm gated-GELU block of the same active size."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return MlpBlock(d_ff=c.d_ff, init_std=c.init_std, name="mlp")(RMSNorm(name="norm")(x))


def fwd_bwd_step(module, x):
    """jit(value_and_grad) w.r.t. params and input, as a no-argument call that blocks."""
    params = nn.unbox(module.init(jax.random.PRNGKey(1), x))["params"]

    def loss(p, x):
        return jnp.mean(jnp.square(module.apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(2)})))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def time_steps(steps: dict, repeats: int) -> dict:
    """Median / min seconds of every step (compiled and run once first), timed in interleaved
    rounds (benchmarks/timing.py), as the 2-core machine is shared and its load drifts."""
    first, times = timed_interleaved(steps, warmup=1, reps=repeats)
    return {name: {"median_s": round(statistics.median(t), 4), "min_s": round(min(t), 4),
                   "first_call_s": round(first[name], 3)} for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--group_size", type=int, default=0, help="tokens per routing group (0: all tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["ragged_dot", "padded", "einsum"])
    parser.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=list(ROUTINGS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    group_size = args.group_size or args.tokens
    base = ModelConfig(vocab_size=8, d_model=args.d_model, d_ff=args.d_ff, num_heads=1, head_dim=8,
                       num_encoder_layers=1, num_decoder_layers=1, init_std=0.02,
                       num_experts=args.experts, moe_group_size=group_size)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens // 512 or 1, min(args.tokens, 512), args.d_model))
    routed = args.tokens
    default = select_backend("auto", routed_rows=routed, padded_rows=routed)
    steps = {("dense", ""): fwd_bwd_step(DenseFFN(base.replace(num_experts=0)), x)}
    for name in args.routings:
        config = base.replace(**ROUTINGS[name])
        for backend in args.backends:
            module = MoeBlock(config=config.replace(moe_backend=backend), deterministic=False)
            steps[(name, backend)] = fwd_bwd_step(module, x)
    timed = {}
    rounds = [default] + [b for b in args.backends if b != default]  # the dense FFN rounds with the default
    for i, backend_group in enumerate(rounds):
        members = {k: v for k, v in steps.items() if k[1] == backend_group or (i == 0 and k[0] == "dense")}
        timed.update(time_steps(members, args.repeats))
    dense = timed[("dense", "")]
    print(f"dense FFN: {dense}", file=sys.stderr)
    routings = {}
    for name in args.routings:
        times = {backend: timed[(name, backend)] for backend in args.backends}
        for backend, t in times.items():
            print(f"{name} {backend}: {t}", file=sys.stderr)
        entry = {"backends": times}
        if default in times:
            t = times[default]["median_s"]
            if "einsum" in times:
                entry["speedup_vs_einsum"] = round(times["einsum"]["median_s"] / t, 2)
            entry["overhead_vs_dense"] = round(t / dense["median_s"], 2)
        routings[name] = entry
    result = {
        "benchmark": "moe_dispatch",
        "shape": {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
                  "group_size": group_size},
        "default_backend": default,
        "dense_ffn": dense,
        "routings": routings,
        "machine": machine_info(),
        "repeats": args.repeats,
        "targets": {"speedup_vs_einsum": ">= 3", "overhead_vs_dense": "<= 1.3"},
    }
    speedups = [r["speedup_vs_einsum"] for r in routings.values() if "speedup_vs_einsum" in r]
    overheads = [r["overhead_vs_dense"] for r in routings.values() if "overhead_vs_dense" in r]
    if speedups:
        result["speedup_vs_einsum"] = min(speedups)
    if overheads:
        result["overhead_vs_dense"] = max(overheads)
    return write_report(result, args.out)


if __name__ == "__main__":
    main()
