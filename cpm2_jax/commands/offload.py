"""`cpm2 offload`: greedy decoding of an MoE checkpoint with its experts in host memory and K of
them on the device (InfMoE, cpm2_jax.offload), with a report; `--plan` says what fits."""
from __future__ import annotations

import json
import sys
import time

from cpm2_jax.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "offload", help="MoE inference with experts streamed from host memory (InfMoE)",
        description="Greedy decoding with the experts in host memory and --device_experts K slots on the device; "
                    "JSON lines out (one per input), then one line {\"report\": ...}. --plan: what fits, no decoding.")
    p.add_argument("--checkpoint", help="checkpoint directory (cpm2 convert / cpm2 train output)")
    p.add_argument("--device_experts", type=int, help="K: expert slots on the device")
    p.add_argument("--int8", action="store_true", help="move experts as int8 with per-column scales")
    p.add_argument("--schedule", default="infmoe", help="infmoe (default) or inorder (the public release)")
    p.add_argument("--cache", default="lfu",
                   help="lfu (default: experts stay in their slots, the least often needed evicted first), lru or none")
    p.add_argument("--prefetch", action="store_true", help="prefetch the next MoE layer's likely experts")
    p.add_argument("--prefetch_precision", type=float, default=0.5,
                   help="prefetch only while that kind of guess has been right at least this often (0-1; a running "
                        "average, from 1)")
    p.add_argument("--host_compute", action="store_true",
                   help="run cold experts on the host when their tokens cost less there than moving their weights")
    p.add_argument("--input", default="-", help="inputs, one per line (token ids or JSON {\"inputs\": [...]}); - = stdin")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--bandwidth_gbps", type=float, default=None,
                   help="model the host link at this rate (CPU machines); default: the real link (measured)")
    p.add_argument("--device_memory_gib", type=float, default=None, help="device memory to plan for (default: the device's)")
    p.add_argument("--timeline", default=None, help="write a timeline plot (PNG) of loads and computations")
    p.add_argument("--plan", action="store_true", help="print what fits (largest K, bytes/step, tokens/s) and exit")
    p.add_argument("--gin_file", action="append", default=[], help="(with --plan) a model gin file instead of a checkpoint")
    p.set_defaults(func=run)


def _config_from_gin(files):
    import gin

    from cpm2_jax.gin_utils import model_config, parse_gin

    parse_gin(files, [], "")
    try:
        return model_config()
    finally:
        gin.clear_config()


def run(args) -> int:
    from cpm2_jax.offload.plan import check_fits, plan_for
    from cpm2_jax.offload.options import OffloadOptions, check_options

    if args.plan:
        if args.checkpoint:
            from cpm2_jax.infer import load_checkpoint

            params, config = load_checkpoint(args.checkpoint)
        elif args.gin_file:
            params, config = None, _config_from_gin(args.gin_file)
        else:
            raise ConfigError("--plan needs --checkpoint DIR or --gin_file FILE")
        plan = plan_for(config, params, device_gib=args.device_memory_gib, bandwidth_gbps=args.bandwidth_gbps,
                        int8=args.int8)
        print(json.dumps({"plan": plan.as_dict()}))
        return 0
    if not args.checkpoint:
        raise ConfigError("--checkpoint DIR is required (or --plan)")
    if args.device_experts is None:
        raise ConfigError("--device_experts K is required")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    from cpm2_jax.infer import load_checkpoint, read_examples

    params, config = load_checkpoint(args.checkpoint)
    options = OffloadOptions(device_experts=args.device_experts, schedule=args.schedule, cache=args.cache,
                             prefetch=args.prefetch, prefetch_precision=args.prefetch_precision, int8=args.int8,
                             host_compute=args.host_compute,
                             bandwidth=args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else None)
    check_options(config, options)
    check_fits(plan_for(config, params, device_gib=args.device_memory_gib,
                        bandwidth_gbps=args.bandwidth_gbps or 1.0, int8=args.int8), args.device_experts)
    examples = read_examples(args.input, vocabulary=None, vocab_size=config.vocab_size, need_targets=False)
    return _decode(config, params, options, examples, args)


def _decode(config, params, options, examples, args) -> int:
    import numpy as np

    from cpm2_jax.decoding import EOS_ID
    from cpm2_jax.offload.runner import OffloadRunner

    with OffloadRunner(config, params, options) as runner:
        runner.reset_stats()
        start, generated = time.perf_counter(), 0
        for example in examples:
            ids = np.asarray([example["input_ids"]], np.int32)
            out = runner.greedy(ids, max_new_tokens=args.max_new_tokens)
            tokens = [int(t) for t in np.asarray(out.tokens)[0][:int(np.asarray(out.lengths)[0])]]
            generated += len(tokens)
            print(json.dumps({"inputs": example["input_ids"], "outputs": tokens,
                              "ended": bool(tokens and tokens[-1] == EOS_ID)}))
        elapsed = time.perf_counter() - start
        st = runner.stats
        report = {"device_experts": options.device_experts, "schedule": options.schedule, "cache": options.cache,
                  "prefetch": options.prefetch, "int8": options.int8, "expert_bytes": runner.store.expert_bytes,
                  "host_compute": options.host_compute, "loads": st.loads, "bytes_moved": st.bytes_moved,
                  "cache_hit_rate": round(st.hit_rate, 4), "prefetches": st.prefetches,
                  "prefetch_guess_precision": round(st.guess_precision, 4), "host_computes": st.host_computes,
                  "fills": st.fills, "transfer_wait_s": round(st.wait_time, 4),
                  "transfer_s": round(st.transfer_time, 4), "link_gb_s": round(st.link_bandwidth / 1e9, 4),
                  "moe_s": round(st.moe_time, 4), "overlap_efficiency": round(st.efficiency, 4),
                  "tokens": generated, "tokens_per_s": round(generated / elapsed, 3), "seconds": round(elapsed, 3),
                  "peak_device_experts": runner.slots.peak}
        if args.timeline:
            from cpm2_jax.offload.timeline import plot_timeline

            plot_timeline(st.timeline, args.timeline, title=f"K={options.device_experts} {options.schedule}")
            report["timeline"] = args.timeline
    print(json.dumps({"report": report}))
    sys.stdout.flush()
    return 0
