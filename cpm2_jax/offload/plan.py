"""What fits: from a model's parameter shapes (a checkpoint's, or a config's through
jax.eval_shape - the 198B one allocates nothing) and the device's memory, the largest K expert
slots, the bytes a decoding step moves and the tokens/s that implies at a link bandwidth.

    resident = all weights - expert weights          (kept on the device)
    K_max    = floor((memory * USABLE - resident) / bytes per expert), at most E
    bytes/step (batch 1, greedy, every expert a miss) = decoder MoE layers * top_k * bytes/expert
    tokens/s <= bandwidth / bytes per step           (CPM2_FACTS: 6 GB/step, ~110 ms over PCIe 5)
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError

USABLE = 0.9  # of the device memory: the rest for activations, caches and the allocator


@dataclasses.dataclass(frozen=True)
class Plan:
    num_experts: int
    moe_layers: int
    decoder_moe_layers: int
    expert_bytes: int  # one expert over the link (int8: quantised)
    resident_bytes: int
    device_bytes: int
    largest_k: int
    bytes_per_step: int
    bandwidth: float  # bytes/s
    tokens_per_s: float  # batch-1 greedy when every expert misses the device
    slot_bytes: int = 0  # one expert in a device slot (int8 is dequantised there before its first computation)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["gib"] = {k: round(getattr(self, k) / 2 ** 30, 3) for k in ("expert_bytes", "slot_bytes", "resident_bytes",
                                                                        "device_bytes", "bytes_per_step")}
        return out


def expert_bytes(config: ModelConfig, itemsize: int, int8: bool = False) -> int:
    """One expert: its RMSNorm scale and FFN matrices (int8: 1 byte each + a float32 scale per
    output column; the norm scale stays float32)."""
    d, f = config.d_model, config.d_ff
    matrices = [(d, f)] * (len(("wi_0", "wi_1")) if config.ffn_activation == "gated_gelu" else 1) + [(f, d)]
    norm = d if config.moe_expert_norm else 0
    if int8:
        return sum(a * b + 4 * b for a, b in matrices) + 4 * norm
    return (sum(a * b for a, b in matrices) + norm) * itemsize


def param_bytes(params) -> tuple[int, int]:
    """(all bytes, expert bytes) of a parameter tree (arrays or ShapeDtypeStructs)."""
    total = experts = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = getattr(leaf, "value", leaf)
        n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += n
        if any(getattr(k, "key", None) == "experts" for k in path):
            experts += n
    return total, experts


def abstract_params(config: ModelConfig):
    from cpm2_jax.footprint import abstract_variables

    return abstract_variables(config)["params"]


def device_memory(device) -> int:
    """Bytes the device can hold: its allocator's limit, or the host RAM for the CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_bandwidth(device, nbytes: int = 64 << 20, reps: int = 3) -> float:
    """Host -> device bytes/s: device_put from pinned host memory where the device has it."""
    from cpm2_jax.offload.store import host_memory_kind

    host = np.ones(nbytes // 4, np.float32)
    kind = host_memory_kind(device)
    if kind:
        host = jax.device_put(host, jax.sharding.SingleDeviceSharding(device, memory_kind=kind))
    sharding = jax.sharding.SingleDeviceSharding(device)
    jax.device_put(host, sharding).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        jax.device_put(host, sharding).block_until_ready()
    return nbytes * reps / (time.perf_counter() - start)


def make_plan(config: ModelConfig, params=None, *, device_bytes: int, bandwidth: float, int8: bool = False) -> Plan:
    if not config.is_moe:
        raise ConfigError("the model is dense (num_experts = 0): nothing to offload")
    params = abstract_params(config) if params is None else params
    total, experts = param_bytes(params)
    moe_layers = sum(config.is_moe_layer(s, i) for s, n in (("encoder", config.num_encoder_layers),
                                                             ("decoder", config.num_decoder_layers))
                     for i in range(n))
    dec_layers = sum(config.is_moe_layer("decoder", i) for i in range(config.num_decoder_layers))
    itemsize = experts // max(1, moe_layers * config.num_experts * (expert_bytes(config, 1)))
    per_expert = expert_bytes(config, max(1, itemsize), int8)  # over the link
    slot = expert_bytes(config, max(1, itemsize))  # on the device (int8 is dequantised there before its first computation)
    resident = total - experts
    largest = int(min(config.num_experts, max(0, (device_bytes * USABLE - resident) // slot)))
    step = dec_layers * config.moe_top_k * per_expert
    return Plan(num_experts=config.num_experts, moe_layers=moe_layers, decoder_moe_layers=dec_layers,
                expert_bytes=per_expert, resident_bytes=resident, device_bytes=device_bytes, largest_k=largest,
                bytes_per_step=step, bandwidth=bandwidth, tokens_per_s=bandwidth / step if step else float("inf"),
                slot_bytes=slot)


def check_fits(plan: Plan, k: int) -> None:
    """One clear line when K slots plus the resident weights do not fit."""
    if plan.largest_k < 1:
        raise ConfigError(f"the resident (non-expert) weights, {plan.resident_bytes / 2**30:.2f} GiB, leave no room "
                          f"for one expert ({plan.slot_bytes / 2**30:.3f} GiB) in {plan.device_bytes / 2**30:.2f} GiB "
                          f"of device memory")
    if k > plan.largest_k:
        raise ConfigError(f"--device_experts {k} does not fit: {k} x {plan.slot_bytes / 2**30:.3f} GiB experts + "
                          f"{plan.resident_bytes / 2**30:.2f} GiB resident weights exceed {USABLE:.0%} of "
                          f"{plan.device_bytes / 2**30:.2f} GiB; the largest K that fits is {plan.largest_k}")


def plan_for(config: ModelConfig, params=None, *, device=None, device_gib: Optional[float] = None,
             bandwidth_gbps: Optional[float] = None, int8: bool = False) -> Plan:
    """make_plan with the device's memory (or `device_gib`) and the measured (or given) bandwidth."""
    device = device or jax.devices()[0]
    mem = int(device_gib * 2 ** 30) if device_gib else device_memory(device)
    bw = bandwidth_gbps * 1e9 if bandwidth_gbps else measure_bandwidth(device)
    return make_plan(config, params, device_bytes=mem, bandwidth=bw, int8=int8)
