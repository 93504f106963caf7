"""The MoE sizes (CPM2_FACTS "Mixture of experts"): every FFN of every layer an MoE of experts
routed by BASE balanced assignment. Registered into `cpm2_jax.config.SIZES` on import."""
from __future__ import annotations

from cpm2_jax.config import SIZES, register_size

# CPM-2-MoE, 198B: cpm2_11b with 32 experts in all 24+24 FFNs (48 x 32 x 125.8M + ~5B shared).
MOE_SIZES = {
    "cpm2_moe_198b": SIZES["cpm2_11b"].replace(num_experts=32, moe_router="balanced", scan_layers=True),
    # Test / development sizes: the dense tiny and small bodies with 4 and 8 experts.
    "cpm2_moe_tiny": SIZES["tiny"].replace(num_experts=4, moe_router="balanced"),
    "cpm2_moe_small": SIZES["small"].replace(num_experts=8, moe_router="balanced"),
}

for _name, _config in MOE_SIZES.items():
    register_size(_name, _config)
