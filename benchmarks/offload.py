"""InfMoE offloading on the CPU with the paced link model (cpm2_jax.offload).

1. One MoE layer, 32 experts, Zipf-skewed routing, K slots, link bandwidth set so one expert's
   load takes as long as an average expert's computation: the InfMoE order and in-order double
   buffering, each as efficiency = lower bound / measured, lower bound = max(sum of expert
   computations measured with every expert resident, sum of loads at the link's rate).
2. Greedy decoding (batch 1) of a small MoE model with Zipf-skewed routers: tokens/s of in-order
   streaming with no cache against LRU cache + prefetch, and + int8 transfer; decode_speedup.

    python benchmarks/offload.py            # CPU, ~minutes; --quick for a smoke run
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import RESULTS_DIR, machine_info, write_report  # noqa: E402
from cpm2_jax.config import get_config  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from cpm2_jax.offload.runner import CostModel, OffloadOptions, OffloadRunner  # noqa: E402
from cpm2_jax.offload.split_moe import route  # noqa: E402


def zipf_probs(n: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def build(args, layers: int, seed: int = 0):
    """An MoE model whose routers prefer experts by a Zipf law: centroid e scaled by a
    log-probability-like margin, so argmax routing of random hidden states is skewed."""
    c = get_config("cpm2_moe_tiny", vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff,
                   num_heads=4, head_dim=args.d_model // 4, num_experts=args.experts,
                   num_encoder_layers=layers, num_decoder_layers=layers, init_std=0.05)
    tok = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(EncoderDecoder(c).init(jax.random.PRNGKey(seed), tok, tok)["params"])
    boost = jnp.asarray(1.0 + 3.0 * zipf_probs(args.experts) / zipf_probs(args.experts)[0], jnp.float32)

    def skew(path, a):
        names = [getattr(k, "key", "") for k in path]
        return a * boost if "centroids" in names else a

    return c, jax.tree_util.tree_map_with_path(skew, params)


def zipf_hidden(c, params, tokens: int, rng) -> jax.Array:
    """[1, tokens, d] hidden states routed by a Zipf law: token t is centroid e_t plus noise."""
    centroids = np.asarray(params["encoder"]["layers_0"]["moe"]["router"]["centroids"])  # [d, E]
    experts = rng.choice(c.num_experts, size=tokens, p=zipf_probs(c.num_experts))
    h = centroids[:, experts].T * 50.0 + rng.normal(0, 0.01, size=(tokens, c.d_model))
    return jnp.asarray(h[None], jnp.float32)


def layer_benchmark(args, rng) -> dict:
    c, params = build(args, layers=1)
    h = zipf_hidden(c, params, args.tokens, rng)
    # Every expert resident: the computations alone (the lower bound's compute term).
    with OffloadRunner(c, params, OffloadOptions(device_experts=c.num_experts, cache="lru"),
                       cost=CostModel(1e-4, 1e-5, 1e-4)) as resident:
        resident.moe_ffn("encoder", 0, h)  # loads everything once, compiles every tile
        compute_times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            resident.moe_ffn("encoder", 0, h)
            compute_times.append(time.perf_counter() - t)
        counts = np.asarray(route(c, resident.model.moe_params("encoder", 0)["router"], h).counts)
        cost = resident.calibrate()  # compute estimates for the schedule (and the real link's load time)
    compute_s = statistics.median(compute_times)
    active = int(np.count_nonzero(counts))
    expert_bytes = resident.store.expert_bytes
    if args.real_link:
        bandwidth, load_s = None, cost.load
    else:  # one load ~ one average computation
        bandwidth = args.bandwidth or expert_bytes / (compute_s / active)
        load_s = expert_bytes / bandwidth
    out = {"experts": c.num_experts, "active_experts": active, "tokens": args.tokens, "slots": args.slots,
           "expert_bytes": expert_bytes, "bandwidth_gb_s": round(expert_bytes / load_s / 1e9, 3),
           "zipf_counts": sorted(counts.tolist(), reverse=True),
           "compute_all_resident_s": round(compute_s, 5)}
    for schedule in ("infmoe", "inorder"):
        opts = OffloadOptions(device_experts=args.slots, schedule=schedule, cache="none", bandwidth=bandwidth)
        with OffloadRunner(c, params, opts, cost=CostModel(cost.overhead, cost.per_token, load_s)) as r:
            r.moe_ffn("encoder", 0, h)  # warm-up
            times, waits, link = [], [], []
            for _ in range(args.reps):
                r.reset_stats()
                t = time.perf_counter()
                r.moe_ffn("encoder", 0, h)
                times.append(time.perf_counter() - t)
                waits.append(r.stats.wait_time)
                link.append(r.stats.transfer_time)
                assert r.slots.peak <= args.slots
            loads_s = r.stats.loads * load_s
        measured = statistics.median(times)
        bound = max(compute_s, loads_s)
        out[f"{schedule}_s"] = round(measured, 5)
        out[f"{schedule}_wait_s"] = round(statistics.median(waits), 5)
        out[f"{schedule}_efficiency"] = round(bound / measured, 4)
        # The paced copy thread is itself slowed by a busy machine: the bound with the link
        # time it actually took, beside the one at its nominal rate.
        out[f"{schedule}_link_busy_s"] = round(statistics.median(link), 5)
        out[f"{schedule}_efficiency_vs_measured_link"] = round(max(compute_s, statistics.median(link)) / measured, 4)
        out["loads_s"] = round(loads_s, 5)
    return out


def decode_benchmark(args, rng, bandwidth: float) -> dict:
    c, params = build(args, layers=args.layers, seed=1)
    enc = rng.integers(2, args.vocab, size=(1, 12)).astype(np.int32)
    arms = {"inorder_stream": OffloadOptions(args.slots, schedule="inorder", cache="none", bandwidth=bandwidth),
            "cache_prefetch": OffloadOptions(args.slots, cache="lru", prefetch=True, bandwidth=bandwidth),
            "cache_prefetch_int8": OffloadOptions(args.slots, cache="lru", prefetch=True, int8=True,
                                                  bandwidth=bandwidth)}
    out, tokens = {}, {}
    for name, opts in arms.items():
        with OffloadRunner(c, params, opts) as r:
            r.greedy(enc, max_new_tokens=args.new_tokens)  # compiles every shape this arm meets
            r.empty_slots()
            r.reset_stats()
            t = time.perf_counter()
            res = r.greedy(enc, max_new_tokens=args.new_tokens)
            dt = time.perf_counter() - t
            n = int(np.asarray(res.lengths)[0])
            tokens[name] = np.asarray(res.tokens)[0]
            out[name] = {"tokens_per_s": round(n / dt, 3), "tokens": n, "seconds": round(dt, 3),
                         "loads": r.stats.loads, "hit_rate": round(r.stats.hit_rate, 3),
                         "bytes_moved": r.stats.bytes_moved, "transfer_wait_s": round(r.stats.wait_time, 3)}
    base = out["inorder_stream"]["tokens_per_s"]
    out["decode_speedup"] = round(out["cache_prefetch"]["tokens_per_s"] / base, 3)
    out["decode_speedup_int8"] = round(out["cache_prefetch_int8"]["tokens_per_s"] / base, 3)
    out["same_tokens_f32"] = bool((tokens["cache_prefetch"] == tokens["inorder_stream"]).all())
    out["int8_token_agreement"] = float(np.mean(tokens["cache_prefetch_int8"] == tokens["inorder_stream"]))
    return out


def main(argv=None, name: str = "offload") -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=512, help="tokens through the one-layer benchmark")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers of the decode model")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s (default: matched to compute)")
    p.add_argument("--real_link", action="store_true", help="no link model: device_put over the real link")
    p.add_argument("--quick", action="store_true", help="smoke sizes")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.experts, args.tokens, args.reps, args.new_tokens = 64, 128, 8, 64, 2, 4
    rng = np.random.default_rng(0)
    print(f"[offload] one MoE layer: {args.experts} experts, {args.tokens} tokens, K={args.slots}", file=sys.stderr)
    layer = layer_benchmark(args, rng)
    print(f"[offload] {layer}", file=sys.stderr)
    bandwidth = None if args.real_link else layer["bandwidth_gb_s"] * 1e9
    decode = decode_benchmark(args, rng, bandwidth)
    report = {"benchmark": name, "machine": machine_info(), "args": vars(args), "layer": layer, "decode": decode,
              "infmoe_efficiency": layer["infmoe_efficiency"], "inorder_efficiency": layer["inorder_efficiency"],
              "decode_speedup": decode["decode_speedup"], "decode_speedup_int8": decode["decode_speedup_int8"],
              "targets": {"infmoe_efficiency": 0.9, "decode_speedup": 2.5}}
    suffix = "_quick" if args.quick else ""
    return write_report(report, RESULTS_DIR / f"{name}{suffix}.json")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
