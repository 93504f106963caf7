"""What benchmarks/kernels_gpu.py and kernels_tpu.py share: CPM-2-MoE grouped-matmul shapes,
balanced and Zipf-skewed group sizes, a correctness check against lax.ragged_dot, interleaved
device timing, TFLOP/s with ratios and the fraction of a bf16 peak, and the MoE layer's
forward+backward. Each script passes its own contenders (our kernels, XLA's ragged_dot, jax's
shipped kernel for the platform).

    gmm:  [m, d_model] x [E, d_model, d_ff] -> [m, d_ff]      2 m d_model d_ff FLOPs
    tgmm: [m, d_model]^T x [m, d_ff] per group -> [E, d_model, d_ff]   the same FLOPs
    MoE layer fwd+bwd: 3 expert matmuls x (1 forward + 2 backward) = 18 T d_model d_ff FLOPs
    (the router's T d_model E and the elementwise work are left out of the count).
    Expert FFN (gated GELU) alone: 6 T d_model d_ff FLOPs forward, 18 forward+backward (model
    FLOPs: the fused block's recomputation of x W0 and x W1 is not counted).
    Token permutation (sort-by-expert gather + weighted combine, M = T k rows of d_model):
    forward moves (3 M + T) d_model elements (gather: read + write M rows; combine: read M,
    write T), its fraction of a measured copy bandwidth is the roofline figure.

`recommendation` turns the layer, fused-FFN and permutation timings into the defaults they
argue for (moe_backend auto -> pallas?, moe_fused_ffn, moe_permute_kernels).
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
    parser.add_argument("--ffn_tokens", type=int, default=16384, help="fused vs unfused expert FFN tokens (0: skip)")
    parser.add_argument("--permute_tokens", type=int, default=32768, help="permutation kernels vs XLA tokens (0: skip)")
    parser.add_argument("--permute_k", type=int, default=1, help="choices per token of the permutation benchmark")
    parser.add_argument("--out", default=None)


def problem(args) -> tuple[dict, list, int]:
    """(shape, token counts, MoE layer tokens) of the run: CPM-2-MoE's, or tiny with --smoke
    (which also shrinks args.ffn_tokens and args.permute_tokens)."""
    if args.smoke:
        small = SMOKE["tokens"][0]
        args.ffn_tokens, args.permute_tokens = small if args.ffn_tokens else 0, small if args.permute_tokens else 0
        return {k: SMOKE[k] for k in CPM2_MOE}, SMOKE["tokens"], small if args.layer_tokens else 0
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


def _error(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}


def time_calls(calls: dict, work: float, reps: int, unit: str = "tflops", scale: float = 1e12) -> dict:
    """calls: name -> a no-argument call that blocks until its result is ready. Each is run once
    (compiling it; a failure is reported with its error), then all are timed in interleaved
    rounds: median seconds and `work` / median / `scale` as `unit`."""
    fns, report = {}, {}
    for name, call in calls.items():
        try:
            call()
            fns[name] = call
        except Exception as error:  # e.g. a kernel that does not compile on this device
            report[name] = _error(error)
    if fns:
        _, times = timed_interleaved(fns, warmup=1, reps=reps)
        for name, t in times.items():
            median = statistics.median(t)
            report[name] = {"median_s": round(median, 6), unit: round(work / median / scale, 2)}
    return report


def _blocking(fn, *args) -> Callable:
    jitted = jax.jit(fn)
    return lambda: jax.block_until_ready(jitted(*args))


def time_ops(contenders: dict, op: str, args: tuple, flops: float, reps: int) -> dict:
    """Median seconds and TFLOP/s of every contender's `op` on `args`, timed in interleaved
    rounds; a contender that fails to compile or run is reported with its error."""
    return time_calls({name: _blocking(c[op], *args) for name, c in contenders.items() if c.get(op)}, flops, reps)


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


# MoE layer variants timed side by side: name -> (moe_backend, other ModelConfig fields).
LAYER_VARIANTS = {
    "pallas": ("pallas", {}),  # permutation kernels + gmm
    "pallas_fused_ffn": ("pallas", {"moe_fused_ffn": True}),
    "pallas_xla_permute": ("pallas", {"moe_permute_kernels": False}),
    "xla": ("xla", {}),
}


def moe_layer_step(backend: str, tokens: int, d_model: int, d_ff: int, experts: int, dtype: str,
                   **overrides) -> Callable:
    """jit(value_and_grad) of one MoE layer (MoeBlock: router, dispatch, gated-GELU experts,
    combine) w.r.t. parameters and input, top-1 routing with capacity for every token (so the
    expert matmuls see exactly `tokens` rows), as a no-argument call that blocks."""
    import flax.linen as nn

    from cpm2_jax.config import ModelConfig
    from cpm2_jax.moe.layer import MoeBlock

    config = ModelConfig(vocab_size=8, d_model=d_model, d_ff=d_ff, num_heads=1, head_dim=8,
                         num_encoder_layers=1, num_decoder_layers=1, init_std=0.02, num_experts=experts,
                         moe_router="top_k", moe_top_k=1, moe_capacity_factor=float(experts),
                         moe_group_size=tokens, moe_backend=backend, dtype=dtype, param_dtype=dtype, **overrides)
    length = min(tokens, 512)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // length, length, d_model), jnp.dtype(dtype))
    module = MoeBlock(config=config, deterministic=False)
    params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(1), x))["params"]

    def loss(p, x):
        y = module.apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def time_moe_layer(variants: list, tokens: int, shape: dict, dtype: str, reps: int, peak: float | None) -> dict:
    """The LAYER_VARIANTS named in `variants`, forward+backward, side by side."""
    steps = {}  # each step built at its first call (inside time_calls, which reports a failure)

    def cached(name):
        def call():
            if name not in steps:
                backend, overrides = LAYER_VARIANTS[name]
                steps[name] = moe_layer_step(backend, tokens, shape["d_model"], shape["d_ff"], shape["experts"],
                                             dtype, **overrides)
            steps[name]()
        return call

    report = time_calls({name: cached(name) for name in variants}, 18 * tokens * shape["d_model"] * shape["d_ff"], reps)
    return add_ratios(report, "pallas", peak)


def ffn_contenders(config) -> dict:
    """The gated-GELU expert block (x [m, d], W0/W1 [E, d, f], Wo [E, f, d]): our fused kernels
    (kernels.ffn), the same block from three of our gmm calls (autodiff through gmm's vjp), and
    from lax.ragged_dot."""
    from cpm2_jax.kernels import gmm
    from cpm2_jax.kernels.ffn import ACTIVATION, gated_ffn

    def unfused(matmul):
        return lambda x, w0, w1, wo, s: matmul(ACTIVATION(matmul(x, w0, s)) * matmul(x, w1, s), wo, s)

    return {"fused": lambda x, w0, w1, wo, s: gated_ffn(x, w0, w1, wo, s, config=config),
            "unfused": unfused(lambda x, w, s: gmm(x, w, s, config=config)),
            "xla_ragged_dot": unfused(jax.lax.ragged_dot)}


def time_fused_ffn(config, tokens: int, shape: dict, skew: str, reps: int, peak: float | None) -> dict:
    """Forward and forward+backward of every ffn_contenders entry, side by side, with the fused
    block's max relative error (output, d x, d W0, d W1, d Wo) against the unfused gmm block."""
    d, f, e = shape["d_model"], shape["d_ff"], shape["experts"]
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(keys[0], (tokens, d), jnp.bfloat16)
    w0, w1 = ((jax.random.normal(k, (e, d, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16) for k in keys[1:3])
    wo = (jax.random.normal(keys[3], (e, f, d), jnp.float32) * f ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[4], (tokens, d), jnp.bfloat16)
    sizes = jnp.asarray(group_sizes(tokens, e, skew))
    fns = ffn_contenders(config)

    def train(fn):
        def step(x, w0, w1, wo, s, dy):
            out, vjp = jax.vjp(lambda *a: fn(*a, s), x, w0, w1, wo)
            return out, vjp(dy)
        return step

    report = {"tokens": tokens, "skew": skew}
    try:
        got = jax.jit(train(fns["fused"]))(x, w0, w1, wo, sizes, dy)
        want = jax.jit(train(fns["unfused"]))(x, w0, w1, wo, sizes, dy)
        errors = [max_relative_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        report["fused_max_rel_error_vs_unfused"] = max(errors)
        report[f"within_{BF16_TOLERANCE}"] = max(errors) <= BF16_TOLERANCE
    except Exception as error:
        report["correctness"] = _error(error)
    args = (x, w0, w1, wo, sizes)
    report["forward"] = add_ratios(time_calls({n: _blocking(fn, *args) for n, fn in fns.items()},
                                              6 * tokens * d * f, reps), "fused", peak)
    report["forward_backward"] = add_ratios(time_calls({n: _blocking(train(fn), *args, dy) for n, fn in fns.items()},
                                                       18 * tokens * d * f, reps), "fused", peak)
    return report


def measured_copy_gbps(reps: int, elements: int = 1 << 28) -> float:
    """x + 1 over a bf16 array (read + write): the reachable memory bandwidth, GB/s."""
    x = jnp.ones((elements,), jnp.bfloat16)
    report = time_calls({"copy": _blocking(lambda a: a + 1, x)}, 2 * 2 * elements, reps, "gbps", 1e9)
    return report["copy"]["gbps"]


def time_permutation(config, tokens: int, d: int, experts: int, k: int, reps: int,
                     bandwidth: float | None) -> dict:
    """The permutation kernels (kernels.permutation: permute then combine, the experts left out)
    vs jnp.take and a weighted sum, forward and forward+backward; random top-k experts, none
    dropped; GB/s of the forward and its fraction of `bandwidth`."""
    from cpm2_jax.kernels.permutation import combine, inverse_maps, permute

    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    expert = jax.random.randint(keys[0], (tokens * k,), 0, experts)  # assignment a = token * k + choice
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
    token_of_row, choice_of_row = order // k, order % k
    rows_of_token = inverse_maps(token_of_row, tokens, k, choice_of_row)
    x = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
    weights = jax.random.uniform(keys[2], (tokens, k), jnp.float32)
    d_out = jax.random.normal(keys[3], (tokens, d), jnp.bfloat16)

    def forward(use):
        def run(x, w):
            rows = permute(x, token_of_row, rows_of_token, use_kernels=use, config=config)
            return combine(rows, w, rows_of_token, token_of_row, use_kernels=use, config=config)
        return run

    def train(use):
        def run(x, w, d_out):
            out, vjp = jax.vjp(forward(use), x, w)
            return out, vjp(d_out)
        return run

    moved = (3 * tokens * k + tokens) * d * x.dtype.itemsize
    report = {"tokens": tokens, "k": k, "d_model": d}
    try:
        got, want = jax.jit(train(True))(x, weights, d_out), jax.jit(train(False))(x, weights, d_out)
        report["kernels_max_rel_error_vs_xla"] = max(max_relative_error(a, b)
                                                     for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    except Exception as error:
        report["correctness"] = _error(error)
    names = {"kernels": True, "xla_gather": False}
    fwd = time_calls({n: _blocking(forward(u), x, weights) for n, u in names.items()}, moved, reps, "gbps", 1e9)
    for entry in fwd.values():
        if bandwidth and "gbps" in entry:
            entry["fraction_of_copy_bandwidth"] = round(entry["gbps"] / bandwidth, 3)
    report["forward"] = fwd
    report["forward_backward"] = time_calls({n: _blocking(train(u), x, weights, d_out) for n, u in names.items()},
                                            1.0, reps, "calls_per_s", 1.0)
    return report


def _median(entry: dict, *path):
    for key in path:
        entry = entry.get(key, {}) if isinstance(entry, dict) else {}
    return entry.get("median_s") if isinstance(entry, dict) else None


def recommendation(result: dict) -> dict:
    """Which defaults the measurements argue for; None where the figures to decide are missing
    (a contender failed or was skipped). A change needs the faster side in every measurement."""
    layer = result.get("moe_layer_fwd_bwd", {}).get("backends", {})
    ffn = result.get("fused_ffn", {})
    perm = result.get("permutation", {})

    def faster(pairs):
        if any(a is None or b is None for a, b in pairs):
            return None
        return all(a < b for a, b in pairs)

    best_pallas = min((v["median_s"] for k, v in layer.items() if k.startswith("pallas") and "median_s" in v),
                      default=None)
    auto = faster([(best_pallas, _median(layer, "xla"))])
    fused = faster([(_median(ffn, "forward_backward", "fused"), _median(ffn, "forward_backward", "unfused")),
                    (_median(layer, "pallas_fused_ffn"), _median(layer, "pallas"))])
    permute = faster([(_median(perm, "forward_backward", "kernels"), _median(perm, "forward_backward", "xla_gather")),
                      (_median(layer, "pallas"), _median(layer, "pallas_xla_permute"))])
    say = lambda flag, yes, no, verdict: (f"{flag}: undecided (missing figures)" if verdict is None
                                          else f"{flag}: {yes if verdict else no}")
    return {
        "auto_picks_pallas": auto, "moe_fused_ffn_default": fused, "moe_permute_kernels_default": permute,
        "advice": [say("moe_backend auto", "pick pallas on this platform (AUTO_BACKEND)",
                       "keep ragged_dot", auto),
                   say("moe_fused_ffn", "default True", "keep False", fused),
                   say("moe_permute_kernels", "keep True", "default False (XLA gather is faster)", permute)],
    }


def run_suite(*, contenders: dict, ours: str, tokens_list: list, shape: dict, skews: list, reps: int,
              peak: float | None, layer_backends: list, layer_tokens: int | None, dtype: str, log,
              kernel_config=None, ffn_tokens: int = 0, permute_tokens: int = 0, permute_k: int = 1,
              bandwidth: float | None = None) -> dict:
    """Correctness (first), then gmm and tgmm over tokens x skew, the fused expert FFN vs
    unfused and the permutation kernels vs XLA's gather (with `kernel_config`, our kernels'),
    then the MoE layer variants, and the defaults the figures argue for."""
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
    if kernel_config is not None and ffn_tokens:
        result["fused_ffn"] = time_fused_ffn(kernel_config, ffn_tokens, shape, "zipf", reps, peak)
        log(f"fused FFN (zipf): {result['fused_ffn']}")
    if kernel_config is not None and permute_tokens:
        result["permutation"] = time_permutation(kernel_config, permute_tokens, shape["d_model"], shape["experts"],
                                                 permute_k, reps, bandwidth)
        log(f"permutation: {result['permutation']}")
    if layer_backends and layer_tokens:
        backends = time_moe_layer(layer_backends, layer_tokens, shape, dtype, reps, peak)
        result["moe_layer_fwd_bwd"] = {"tokens": layer_tokens, "router": "top_k k=1 (capacity for all tokens)",
                                       "backends": backends}
        log(f"MoE layer fwd+bwd: {result['moe_layer_fwd_bwd']}")
    result["recommendation"] = recommendation(result)
    for line in result["recommendation"]["advice"]:
        log(f"recommended default: {line}")
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
