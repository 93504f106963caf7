"""What benchmarks/kernels_gpu.py and kernels_tpu.py share: CPM-2-MoE grouped-matmul shapes,
balanced and Zipf-skewed group sizes, a correctness check against lax.ragged_dot, interleaved
device timing, TFLOP/s with ratios and the fraction of a bf16 peak, and the MoE layer's
forward+backward. Each script passes its own contenders (our kernels, XLA's ragged_dot, jax's
shipped kernel for the platform).

    gmm:  [m, d_model] x [E, d_model, d_ff] -> [m, d_ff]      2 m d_model d_ff FLOPs
    tgmm: [m, d_model]^T x [m, d_ff] per group -> [E, d_model, d_ff]   the same FLOPs
    MoE layer fwd+bwd: 3 expert matmuls x (1 forward + 2 backward) = 18 T d_model d_ff FLOPs
    (the router's T d_model E and the elementwise work are left out of the count).
"""
from __future__ import annotations

import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from timing import timed_interleaved  # noqa: E402  (benchmarks/timing.py)

CPM2_MOE = {"d_model": 4096, "d_ff": 10240, "experts": 32}
BF16_TOLERANCE = 2e-2  # correctness: max |error| / max |reference| of a bf16 result
SMOKE = {"d_model": 32, "d_ff": 48, "experts": 4, "tokens": [64]}
# Dense bf16 peaks from the vendors' data sheets (no sparsity), by device_kind substring.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "L4": 121.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
                    "TPU v4": 275.0, "TPU v6": 918.0, "TPU7x": 2307.0}


def add_arguments(parser) -> None:
    """The flags both scripts take."""
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (runs on a CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--skews", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--blocks", type=int, nargs=3, default=None, metavar=("TM", "TK", "TN"))
    parser.add_argument("--layer_tokens", type=int, default=16384, help="MoE layer tokens (0: skip)")
    parser.add_argument("--out", default=None)


def problem(args) -> tuple[dict, list, int]:
    """(shape, token counts, MoE layer tokens) of the run: CPM-2-MoE's, or tiny with --smoke."""
    if args.smoke:
        return {k: SMOKE[k] for k in CPM2_MOE}, SMOKE["tokens"], SMOKE["tokens"][0] if args.layer_tokens else 0
    return dict(CPM2_MOE), args.tokens, args.layer_tokens


def xla_ragged_dot() -> dict:
    """XLA's contender: ragged_dot, and for the weight gradient ragged_dot_general with the
    ragged dimension contracted ([m, k]^T [m, n] per group -> [E, k, n])."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return {"gmm": jax.lax.ragged_dot, "tgmm": lambda x, g, s: jax.lax.ragged_dot_general(x, g, s, dims)}


def group_sizes(tokens: int, experts: int, skew: str) -> np.ndarray:
    """`balanced`: tokens/experts each (remainder to the first); `zipf`: p_e ~ 1/(e+1), rounded
    down, remainder to expert 0, the last expert emptied into expert 0 (a zero-sized group)."""
    if skew == "balanced":
        sizes = np.full(experts, tokens // experts)
    else:
        p = 1.0 / np.arange(1, experts + 1)
        sizes = np.floor(tokens * p / p.sum()).astype(np.int64)
        sizes[-1] = 0
    sizes[0] += tokens - sizes.sum()
    return sizes.astype(np.int32)


def operands(tokens: int, d_model: int, d_ff: int, experts: int, dtype=jnp.bfloat16, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(k1, (tokens, d_model), dtype)
    rhs = (jax.random.normal(k2, (experts, d_model, d_ff), jnp.float32) * d_model ** -0.5).astype(dtype)
    grad = jax.random.normal(k3, (tokens, d_ff), dtype)
    return lhs, rhs, grad


def bf16_peak(device) -> tuple[float | None, str]:
    kind = getattr(device, "device_kind", "")
    for name, peak in BF16_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak, kind
    return None, kind


def measured_matmul_tflops(size: int, reps: int) -> float:
    """A dense bf16 [size, size] x [size, size] XLA matmul: the reachable peak of this device."""
    a = jnp.ones((size, size), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    _, times = timed_interleaved({"mm": lambda: jax.block_until_ready(f(a, a))}, warmup=2, reps=reps)
    return 2 * size ** 3 / statistics.median(times["mm"]) / 1e12


def max_relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_against_ragged_dot(contenders: dict, lhs, rhs, grad, sizes) -> dict:
    """Every contender's gmm (and tgmm where it has one) vs lax.ragged_dot and its weight
    gradient: the max error relative to the largest reference value."""
    sizes = jnp.asarray(sizes)
    want = jax.jit(jax.lax.ragged_dot)(lhs, rhs, sizes)
    want_w = jax.jit(jax.grad(lambda r: jnp.vdot(jax.lax.ragged_dot(lhs, r, sizes).astype(jnp.float32),
                                                 grad.astype(jnp.float32))))(rhs)
    report = {}
    for name, c in contenders.items():
        entry = {}
        try:
            if c.get("gmm"):
                entry["gmm_max_rel_error"] = max_relative_error(jax.jit(c["gmm"])(lhs, rhs, sizes), want)
            if c.get("tgmm"):
                entry["tgmm_max_rel_error"] = max_relative_error(jax.jit(c["tgmm"])(lhs, grad, sizes), want_w)
        except Exception as error:  # a shipped kernel that does not run here (e.g. Hopper-only)
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        errors = [v for key, v in entry.items() if key.endswith("_error")]
        if errors:  # bf16 outputs: a few ulps (2^-8 each) of the largest value
            entry[f"within_{BF16_TOLERANCE}"] = max(errors) <= BF16_TOLERANCE
        report[name] = entry
    return report


def time_ops(contenders: dict, op: str, args: tuple, flops: float, reps: int) -> dict:
    """Median seconds and TFLOP/s of every contender's `op` on `args`, timed in interleaved
    rounds; a contender that fails to compile or run is reported with its error."""
    fns, report = {}, {}
    for name, c in contenders.items():
        fn = c.get(op)
        if fn is None:
            continue
        jitted = jax.jit(fn)
        try:
            jax.block_until_ready(jitted(*args))
        except Exception as error:
            report[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        fns[name] = (lambda f: lambda: jax.block_until_ready(f(*args)))(jitted)
    if fns:
        _, times = timed_interleaved(fns, warmup=1, reps=reps)
        for name, t in times.items():
            median = statistics.median(t)
            report[name] = {"median_s": round(median, 6), "tflops": round(flops / median / 1e12, 2)}
    return report


def add_ratios(report: dict, ours: str, peak: float | None) -> dict:
    """ours/other throughput ratios and, with a peak, every contender's fraction of it."""
    base = report.get(ours, {}).get("tflops")
    for name, entry in report.items():
        if "tflops" not in entry:
            continue
        if peak:
            entry["fraction_of_bf16_peak"] = round(entry["tflops"] / peak, 3)
        if base and name != ours:
            entry[f"{ours}_speedup"] = round(base / entry["tflops"], 2)
    return report


def moe_layer_step(backend: str, tokens: int, d_model: int, d_ff: int, experts: int, dtype: str) -> Callable:
    """jit(value_and_grad) of one MoE layer (MoeBlock: router, dispatch, gated-GELU experts,
    combine) w.r.t. parameters and input, top-1 routing with capacity for every token (so the
    expert matmuls see exactly `tokens` rows), as a no-argument call that blocks."""
    import flax.linen as nn

    from cpm2_jax.config import ModelConfig
    from cpm2_jax.moe.layer import MoeBlock

    config = ModelConfig(vocab_size=8, d_model=d_model, d_ff=d_ff, num_heads=1, head_dim=8,
                         num_encoder_layers=1, num_decoder_layers=1, init_std=0.02, num_experts=experts,
                         moe_router="top_k", moe_top_k=1, moe_capacity_factor=float(experts),
                         moe_group_size=tokens, moe_backend=backend, dtype=dtype, param_dtype=dtype)
    length = min(tokens, 512)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // length, length, d_model), jnp.dtype(dtype))
    module = MoeBlock(config=config, deterministic=False)
    params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(1), x))["params"]

    def loss(p, x):
        y = module.apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def time_moe_layer(backends: list, tokens: int, shape: dict, dtype: str, reps: int, peak: float | None) -> dict:
    flops = 18 * tokens * shape["d_model"] * shape["d_ff"]
    fns, report = {}, {}
    for backend in backends:
        try:
            step = moe_layer_step(backend, tokens, shape["d_model"], shape["d_ff"], shape["experts"], dtype)
            step()
            fns[backend] = step
        except Exception as error:
            report[backend] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    if fns:
        _, times = timed_interleaved(fns, warmup=1, reps=reps)
        for name, t in times.items():
            median = statistics.median(t)
            report[name] = {"median_s": round(median, 6), "tflops": round(flops / median / 1e12, 2)}
    return add_ratios(report, "pallas", peak)


def run_suite(*, contenders: dict, ours: str, tokens_list: list, shape: dict, skews: list, reps: int,
              peak: float | None, layer_backends: list, layer_tokens: int | None, dtype: str, log) -> dict:
    """Correctness (first), then gmm and tgmm over tokens x skew, then the MoE layer."""
    lhs, rhs, grad = operands(min(tokens_list), shape["d_model"], shape["d_ff"], shape["experts"])
    sizes = group_sizes(min(tokens_list), shape["experts"], "zipf")
    correctness = check_against_ragged_dot(contenders, lhs, rhs, grad, sizes)
    log(f"correctness vs ragged_dot (tokens {min(tokens_list)}, zipf): {correctness}")
    runs = []
    for tokens in tokens_list:
        lhs, rhs, grad = operands(tokens, shape["d_model"], shape["d_ff"], shape["experts"])
        flops = 2 * tokens * shape["d_model"] * shape["d_ff"]
        for skew in skews:
            sizes = jnp.asarray(group_sizes(tokens, shape["experts"], skew))
            entry = {"tokens": tokens, "skew": skew, "group_sizes": np.asarray(sizes).tolist()}
            for op, args in (("gmm", (lhs, rhs, sizes)), ("tgmm", (lhs, grad, sizes))):
                entry[op] = add_ratios(time_ops(contenders, op, args, flops, reps), ours, peak)
                log(f"{op} tokens={tokens} {skew}: {entry[op]}")
            runs.append(entry)
    result = {"correctness": correctness, "runs": runs}
    if layer_backends and layer_tokens:
        backends = time_moe_layer(layer_backends, layer_tokens, shape, dtype, reps, peak)
        result["moe_layer_fwd_bwd"] = {"tokens": layer_tokens, "router": "top_k k=1 (capacity for all tokens)",
                                       "backends": backends}
        log(f"MoE layer fwd+bwd: {result['moe_layer_fwd_bwd']}")
    return result


def summary(result: dict, ours: str, others: list) -> dict:
    """The headline figures: ours / each other contender's gmm throughput (the worst case over
    the runs), and the MoE layer's fraction of the bf16 peak."""
    out = {}
    for other in others:
        ratios = [r["gmm"][other][f"{ours}_speedup"] for r in result["runs"]
                  if f"{ours}_speedup" in r["gmm"].get(other, {})]
        if ratios:
            out[f"gmm_speedup_vs_{other}_min"] = min(ratios)
            out[f"gmm_speedup_vs_{other}_median"] = statistics.median(ratios)
    layer = result.get("moe_layer_fwd_bwd", {}).get("backends", {}).get("pallas", {})
    if "fraction_of_bf16_peak" in layer:
        out["moe_layer_fraction_of_bf16_peak"] = layer["fraction_of_bf16_peak"]
    return out
