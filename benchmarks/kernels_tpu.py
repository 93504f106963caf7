"""Our Pallas grouped matmul (Mosaic lowering) on a TPU against jax's megablox gmm/tgmm and
XLA's lax.ragged_dot, for CPM-2-MoE shapes.

    python benchmarks/kernels_tpu.py                 # d_model 4096, d_ff 10240, 32 experts, bf16
    python benchmarks/kernels_tpu.py --tokens 8192 --blocks 512 1024 1024
    python benchmarks/kernels_tpu.py --smoke         # tiny shapes, interpret mode, on a CPU

In order: correctness of every contender against ragged_dot (gmm output and weight gradient);
gmm and tgmm TFLOP/s for 8k-64k tokens with balanced and Zipf-skewed group sizes (ours,
megablox with the same tiling, ragged_dot), with ratios and the fraction of the bf16 peak;
the fused expert FFN vs unfused, the permutation kernels vs XLA's gather, the MoE layer
forward+backward variants (benchmarks/kernel_suite.LAYER_VARIANTS) and the defaults they argue
for, as benchmarks/kernels_gpu.py. Prints one JSON object last and
writes benchmarks/results/kernels_tpu.json (--smoke: kernels_tpu_smoke.json).
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
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm, tgmm as megablox_tgmm  # noqa: E402

from cpm2_jax.kernels import Blocks, gmm, kernel_config, tgmm  # noqa: E402
from kernel_suite import (LAYER_VARIANTS, add_arguments, bf16_peak, measured_copy_gbps,  # noqa: E402
                          measured_matmul_tflops, problem, run_suite, summary, xla_ragged_dot)
from report import RESULTS_DIR, machine_info, write_report  # noqa: E402


def contenders(blocks: Blocks, interpret: bool) -> dict:
    config = kernel_config("tpu", blocks, interpret=interpret)

    def tiling(m, k, n):  # megablox needs m divisible by tm and takes the same tiles clamped to the problem
        return (min(blocks.tm, m), min(blocks.tk, k), min(blocks.tn, n))

    return {
        "ours": {"gmm": lambda x, w, s: gmm(x, w, s, config=config),
                 "tgmm": lambda x, g, s: tgmm(x, g, s, config=config)},
        "megablox": {
            "gmm": lambda x, w, s: megablox_gmm(x, w, s, preferred_element_type=x.dtype,
                                                tiling=tiling(x.shape[0], x.shape[1], w.shape[2]),
                                                interpret=interpret),
            "tgmm": lambda x, g, s: megablox_tgmm(x.T, g, s, preferred_element_type=x.dtype,
                                                  tiling=tiling(x.shape[0], x.shape[1], g.shape[1]),
                                                  interpret=interpret),
        },
        "xla_ragged_dot": xla_ragged_dot(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    shape, tokens, layer_tokens = problem(args)
    default = kernel_config("tpu").blocks
    tm, tk, tn = args.blocks or ((16, 16, 16) if args.smoke else (default.tm, default.tk, default.tn))
    peak, kind = bf16_peak(jax.devices()[0])
    measured = None if args.smoke else measured_matmul_tflops(8192, args.reps)
    bandwidth = None if args.smoke else measured_copy_gbps(args.reps)
    log(f"device {kind}: data-sheet bf16 peak {peak} TFLOP/s, dense XLA matmul {measured} TFLOP/s")
    result = run_suite(contenders=contenders(Blocks(tm, tk, tn), args.smoke), ours="ours", tokens_list=tokens,
                       shape=shape, skews=args.skews, reps=args.reps, peak=peak or measured,
                       layer_backends=list(LAYER_VARIANTS), layer_tokens=layer_tokens,
                       dtype="float32" if args.smoke else "bfloat16", log=log,
                       kernel_config=kernel_config("tpu", Blocks(tm, tk, tn), interpret=args.smoke), ffn_tokens=args.ffn_tokens,
                       permute_tokens=args.permute_tokens, permute_k=args.permute_k, bandwidth=bandwidth)
    report = {
        "benchmark": "kernels_tpu_smoke" if args.smoke else "kernels_tpu",
        "mode": "interpret (CPU smoke run: no timing meaning)" if args.smoke else "device",
        "shape": {**shape, "dtype": "bfloat16", "tokens": tokens},
        "blocks": {"tm": tm, "tk": tk, "tn": tn},
        "device_kind": kind, "bf16_peak_tflops_datasheet": peak, "dense_matmul_tflops_measured": measured,
        "copy_gbps_measured": bandwidth,
        "summary": summary(result, "ours", ["megablox", "xla_ragged_dot"]),
        **result,
        "seconds": round(time.time() - start, 1),
        "machine": machine_info(),
    }
    return write_report(report, args.out or RESULTS_DIR / f"{report['benchmark']}.json")


if __name__ == "__main__":
    main()
