"""`cpm2 convert dense-to-moe`: upcycle a dense checkpoint into an MoE one (cpm2_jax.moe.upcycle).

    cpm2 convert dense-to-moe DENSE_CKPT OUT_DIR --num_experts 32 [--router balanced] [--seed 0]

DENSE_CKPT is any checkpoint (a `cpm2 train` run, a step folder, a converted directory);
OUT_DIR is a checkpoint in the same format, with the source's vocabulary. A Switch-style
MoE (`--router top_k --top_k 1 --shared_norm --expert_capacity N`) exports with `to-hf`.
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    from cpm2_jax.commands.convert import add_output_args

    p = subparsers.add_parser("dense-to-moe", help="dense cpm2_jax checkpoint -> MoE checkpoint (upcycling)",
                              description="Every expert of every MoE layer becomes a copy of the dense "
                                          "feed-forward block (its RMSNorm included); the router starts fresh.")
    p.add_argument("dense_dir", help="dense checkpoint (a run, step folder or converted directory)")
    add_output_args(p)
    p.add_argument("--num_experts", type=int, required=True, help="experts per MoE layer (CPM-2-MoE: 32)")
    p.add_argument("--router", default="balanced", help="balanced (CPM-2), top_k or experts_choose")
    p.add_argument("--top_k", type=int, default=1, help="experts per token for --router top_k")
    p.add_argument("--capacity_factor", type=float, default=1.0, help="capacity factor (top_k, experts_choose)")
    p.add_argument("--expert_capacity", type=int, default=0,
                   help="fixed slots per expert and routing group (> 0 overrides --capacity_factor; Switch)")
    p.add_argument("--shared_norm", action="store_true",
                   help="one pre-norm before router and experts instead of one per expert (Switch)")
    p.add_argument("--router_bias", action="store_true", help="a bias in the top_k router (Switch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh router parameters")
    p.set_defaults(func=run)


def run(args) -> int:
    from cpm2_jax import checkpoints
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.errors import ConfigError, check_choice
    from cpm2_jax.moe.routing import ROUTERS
    from cpm2_jax.moe.upcycle import upcycle_params

    if args.num_experts <= 0:
        raise ConfigError(f"--num_experts must be positive, got {args.num_experts}")
    check_choice("--router", args.router, ROUTERS)
    if args.expert_capacity < 0:
        raise ConfigError(f"--expert_capacity must be >= 0, got {args.expert_capacity}")
    check_writable(args.out_dir, args.overwrite)
    source = checkpoints.resolve(args.dense_dir)
    dense, dense_config = checkpoints.load_params(source)
    moe_config = dense_config.replace(num_experts=args.num_experts, moe_router=args.router, moe_top_k=args.top_k,
                                      moe_capacity_factor=args.capacity_factor,
                                      moe_expert_capacity=args.expert_capacity, moe_expert_norm=not args.shared_norm,
                                      moe_router_bias=args.router_bias)
    params = upcycle_params(dense, dense_config, moe_config, args.seed)
    checkpoints.save_params(params, moe_config, args.out_dir, overwrite=args.overwrite,
                            vocabulary=checkpoints.saved_vocabulary(source))
    print(json.dumps({"conversion": "dense-to-moe", "source": str(args.dense_dir), "output": str(args.out_dir),
                      "num_experts": args.num_experts, "router": args.router}))
    return 0
