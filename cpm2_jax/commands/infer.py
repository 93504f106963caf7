"""`cpm2 infer`: decode or score inputs from a file or stdin with a checkpoint, writing JSON Lines."""
from __future__ import annotations


def register(subparsers) -> None:
    from cpm2_jax import infer

    p = subparsers.add_parser("infer", help="decode (greedy, beam, sample) or score inputs; JSON Lines out",
                              description=infer.__doc__.split("\n\n")[0])
    infer.add_flags(p)
    p.set_defaults(func=infer.run)
