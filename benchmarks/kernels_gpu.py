"""Our Pallas grouped matmul (Triton lowering) on an NVIDIA GPU (H100/H200) against XLA's
lax.ragged_dot and jax's shipped Mosaic GPU ragged dot (Hopper only), for CPM-2-MoE shapes.

    python benchmarks/kernels_gpu.py                 # d_model 4096, d_ff 10240, 32 experts, bf16
    python benchmarks/kernels_gpu.py --tokens 8192 65536 --reps 5
    python benchmarks/kernels_gpu.py --smoke         # tiny shapes, interpret mode, on a CPU

In order: correctness of every contender against ragged_dot (gmm output and weight gradient);
gmm and tgmm TFLOP/s for 8k-64k tokens with balanced and Zipf-skewed group sizes (ours,
ragged_dot, Mosaic GPU's ragged_dot / transposed_ragged_dot), with ours/theirs ratios and the
fraction of the bf16 peak (data sheet, and a measured dense XLA matmul); the gated-GELU expert
FFN fused (kernels.ffn) vs unfused (three gmms; and ragged_dot), forward and forward+backward;
the permutation kernels vs XLA's gather (GB/s, fraction of a measured copy bandwidth); the MoE
layer forward+backward for backend pallas (permutation kernels + gmm), pallas with the fused
FFN, pallas with XLA's gather, and xla; last, the defaults the figures argue for
("recommended default: ..." lines and the report's `recommendation`: moe_backend auto ->
pallas?, moe_fused_ffn, moe_permute_kernels). Targets (issue 13): gmm >= 1.5x ragged_dot, >= 0.9x Mosaic
GPU; the MoE layer >= 40% of the bf16 peak. Sized to finish in under 5 minutes on an H100.
Prints one JSON object last and writes benchmarks/results/kernels_gpu.json (--smoke:
kernels_gpu_smoke.json).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cpm2_jax.kernels import Blocks, gmm, kernel_config, tgmm  # noqa: E402
from kernel_suite import (LAYER_VARIANTS, add_arguments, bf16_peak, measured_copy_gbps,  # noqa: E402
                          measured_matmul_tflops, problem, run_suite, summary, xla_ragged_dot)
from report import RESULTS_DIR, machine_info, write_report  # noqa: E402


def contenders(blocks: Blocks, interpret: bool, mosaic: dict) -> dict:
    config = kernel_config("gpu", blocks, interpret=interpret)
    out = {
        "ours": {"gmm": lambda x, w, s: gmm(x, w, s, config=config),
                 "tgmm": lambda x, g, s: tgmm(x, g, s, config=config)},
        "xla_ragged_dot": xla_ragged_dot(),
    }
    if not interpret:  # Mosaic GPU kernels have no interpret mode; Hopper (sm_90) only
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

        out["mosaic_gpu"] = {
            "gmm": lambda x, w, s: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **mosaic),
            "tgmm": lambda x, g, s: transposed_ragged_dot_mgpu.transposed_ragged_dot(x, g, group_sizes=s, **mosaic),
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--mosaic_blocks", type=int, nargs=5, default=[128, 128, 64, 4, 2],
                        metavar=("BLOCK_M", "BLOCK_N", "BLOCK_K", "STEPS", "GRID_BLOCK_N"))
    args = parser.parse_args(argv)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    interpret = args.smoke
    shape, tokens, layer_tokens = problem(args)
    default = kernel_config("gpu").blocks
    tm, tk, tn = args.blocks or ((16, 16, 16) if args.smoke else (default.tm, default.tk, default.tn))
    blocks = Blocks(tm, tk, tn, num_warps=args.warps, num_stages=args.stages)
    mosaic = dict(zip(("block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n"), args.mosaic_blocks))
    device = jax.devices()[0]
    peak, kind = bf16_peak(device)
    measured = None if args.smoke else measured_matmul_tflops(8192, args.reps)
    bandwidth = None if args.smoke else measured_copy_gbps(args.reps)
    log(f"device {kind}: data-sheet bf16 peak {peak} TFLOP/s, dense XLA matmul {measured} TFLOP/s")
    result = run_suite(contenders=contenders(blocks, interpret, mosaic), ours="ours", tokens_list=tokens,
                       shape=shape, skews=args.skews, reps=args.reps, peak=peak or measured,
                       layer_backends=list(LAYER_VARIANTS), layer_tokens=layer_tokens,
                       dtype="float32" if args.smoke else "bfloat16", log=log,
                       kernel_config=kernel_config("gpu", blocks, interpret=interpret), ffn_tokens=args.ffn_tokens,
                       permute_tokens=args.permute_tokens, permute_k=args.permute_k, bandwidth=bandwidth)
    others = ["xla_ragged_dot"] + ([] if interpret else ["mosaic_gpu"])
    report = {
        "benchmark": "kernels_gpu_smoke" if args.smoke else "kernels_gpu",
        "mode": "interpret (CPU smoke run: no timing meaning)" if args.smoke else "device",
        "shape": {**shape, "dtype": "bfloat16", "tokens": tokens},
        "blocks": {"tm": tm, "tk": tk, "tn": tn, "num_warps": args.warps, "num_stages": args.stages},
        "mosaic_gpu_blocks": mosaic,
        "device_kind": kind, "bf16_peak_tflops_datasheet": peak, "dense_matmul_tflops_measured": measured,
        "copy_gbps_measured": bandwidth,
        "summary": summary(result, "ours", others),
        "targets": {"gmm_speedup_vs_xla_ragged_dot": ">= 1.5", "gmm_speedup_vs_mosaic_gpu": ">= 0.9",
                    "moe_layer_fraction_of_bf16_peak": ">= 0.4"},
        **result,
        "seconds": round(time.time() - start, 1),
        "machine": machine_info(),
    }
    name = report["benchmark"]
    return write_report(report, args.out or RESULTS_DIR / f"{name}.json")


if __name__ == "__main__":
    main()
