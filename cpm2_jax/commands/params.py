"""`cpm2 params`: parameter count and per-device memory of a gin-configured model, as JSON."""
from __future__ import annotations

import json

from cpm2_jax.errors import ConfigError


def register(subparsers) -> None:
    from cpm2_jax.gin_utils import add_gin_flags

    p = subparsers.add_parser("params", help="parameter count and bytes per device (no allocation)",
                              description="Prints one JSON object: exact parameter total, breakdown, and "
                                          "bytes per device for params and optimizer state under --mesh.")
    add_gin_flags(p)
    p.add_argument("--size", help="a named size (tiny, small, base, cpm2_11b, ...) instead of a gin file")
    p.add_argument("--mesh", default="data=1", help="mesh shape, e.g. data=8,model=8 (axes: data, model, expert)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adafactor, sgd or none")
    p.add_argument("--prompt_length", type=int, default=0,
                   help="add an encoder prompt of this many vectors (prompt tuning): reports its trainable count")
    p.set_defaults(func=run)


def run(args) -> int:
    import gin

    from cpm2_jax.config import get_config
    from cpm2_jax.footprint import footprint
    from cpm2_jax.gin_utils import model_config, parse_gin
    from cpm2_jax.partitioning import parse_mesh_spec

    mesh_shape = parse_mesh_spec(args.mesh)
    if args.size and (args.gin_file or args.gin_bindings):
        raise ConfigError("give either --size or --gin_file/--gin_bindings, not both")
    if args.size:
        config = get_config(args.size)
    elif args.gin_file or args.gin_bindings:
        parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
        config = model_config()
        gin.clear_config()
    else:
        raise ConfigError("no model given: pass --gin_file=gin/models/NAME.gin or --size NAME")
    if args.prompt_length:
        from cpm2_jax.prompts import PromptConfig

        config = config.replace(prompt=PromptConfig(length=args.prompt_length))
    print(json.dumps(footprint(config, mesh_shape, args.optimizer), indent=None))
    return 0
