"""What an offloaded run is told and what it reports: `OffloadOptions` (K slots, schedule, cache,
prefetch, int8, host compute, the modelled link), their checks, the `CostModel` the schedule
and the host-compute choice read (calibrated by `OffloadRunner.calibrate`), and the `Stats`
a run accumulates (the `cpm2 offload` report and the benchmarks' figures)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError, check_choice

SCHEDULES = ("infmoe", "inorder")
CACHES = ("lru", "lfu", "none")


@dataclasses.dataclass(frozen=True)
class OffloadOptions:
    device_experts: int  # K: expert slots on the device
    schedule: str = "infmoe"
    cache: str = "none"
    prefetch: bool = False
    int8: bool = False
    bandwidth: Optional[float] = None  # bytes/s of the modelled link (None: the real one)
    host_compute: bool = False  # run cold experts with few tokens on the host
    # prefetch only while its guesses of a kind ("router", "history") have been right at least this often
    # (a running average; a wrong guess costs a load, its dequantisation and an eviction)
    prefetch_precision: float = 0.5
    # CPU cores the transfer and release threads run on (paced link on the CPU: the link's own core, apart
    # from the one the computation runs on, as a DMA engine is apart from the compute units;
    # None: wherever the process runs)
    link_cores: Optional[tuple] = None


@dataclasses.dataclass
class Stats:
    loads: int = 0
    bytes_moved: int = 0
    needed: int = 0  # experts a layer computed
    hits: int = 0  # ... of which were already on the device (or on their way: prefetched)
    prefetches: int = 0
    prefetch_hits: int = 0  # needed experts that a prefetch had brought
    fills: int = 0  # loads behind a host computation, for the cache
    guessed: int = 0  # experts the prefetch guessed for a layer (issued or not)
    guessed_right: int = 0  # ... that the layer needed
    host_computes: int = 0
    transfer_time: float = 0.0
    wait_time: float = 0.0  # the main thread waiting for weights
    # Over the MoE layers that load experts (a layer served by the cache has no transfer to overlap):
    moe_time: float = 0.0  # their wall time (token counts read to experts done)
    lower_bound: float = 0.0  # sum over them of max(sum of compute, sum of loads)
    layers: int = 0
    timeline: list = dataclasses.field(default_factory=list)

    def merged(self, other: "Stats") -> "Stats":
        """Two runs' counts, times and timelines together (several inputs reported as one)."""
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(Stats)})

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 0.0

    @property
    def guess_precision(self) -> float:
        return self.guessed_right / self.guessed if self.guessed else 0.0

    @property
    def efficiency(self) -> float:
        return self.lower_bound / self.moe_time if self.moe_time else 0.0

    @property
    def link_bandwidth(self) -> float:
        """bytes/s the link delivered while transferring (the set rate when the thread keeps up)."""
        return self.bytes_moved / self.transfer_time if self.transfer_time else 0.0


def check_options(config: ModelConfig, options: OffloadOptions) -> None:
    if not config.is_moe:
        raise ConfigError("the checkpoint is a dense model (num_experts = 0): nothing to offload; "
                          "use `cpm2 infer` for dense checkpoints")
    k = options.device_experts
    if not 1 <= k <= config.num_experts:
        raise ConfigError(f"--device_experts must be between 1 and the number of experts per layer "
                          f"({config.num_experts}), got {k}")
    check_choice("--schedule", options.schedule, SCHEDULES)
    check_choice("--cache", options.cache, CACHES)
    if not 0.0 <= options.prefetch_precision <= 1.0:
        raise ConfigError(f"--prefetch_precision must be between 0 and 1 (a share of guesses), "
                          f"got {options.prefetch_precision}")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Compute time of an expert with n tokens, overhead + n * per_token (seconds), and the load
    time of one expert (bytes / bandwidth): the schedule's c_i and b. `arrive`: an int8
    expert's dequantisation on the device after its load (0 for float); `host_*`: an expert's
    time on the host (its output's hand-over to the device included)."""

    overhead: float
    per_token: float
    load: float
    host_overhead: Optional[float] = None  # the same on the host (None: not calibrated)
    host_per_token: float = 0.0
    arrive: float = 0.0
    # a one-token expert alone on the device, its inputs ready (a decoding step's cache hit; None:
    # the stream's compute(1))
    lone: Optional[float] = None

    def moving(self) -> float:
        """What moving one expert's weights to the device costs: its load and its dequantisation."""
        return self.load + self.arrive

    def compute(self, n: int) -> float:
        return _line(self.overhead, self.per_token, n)

    def fill_pays(self, n: int, uses_per_step: float, steps_left: int) -> bool:
        """Whether loading a host-computed expert behind its computation (a fill, for the cache)
        pays: each later use on the device saves host(n) - device(n) against running it on the
        host again (device(n): the lone call's time, `lone`, as a decoding step's hit runs), and
        the fill costs one move; over the decoding steps left, at its expected uses per step
        (its share of the layer's routing history),

            uses_per_step * steps_left * (host(n) - device(n)) > moving().

        Never where the host computes the n tokens as fast as the device does (host(n) <=
        compute(n), the stream's time): the CPU link model with experts of d_ff 2048, where host
        and device are cores of one RAM and a one-token expert is memory-bound on both (0.73 ms
        on the host, 0.89 ms on the device). There a cached copy saves only a call's dispatch,
        and the fill's traffic costs the step more: measured, a float32 fill made its step 2.5
        ms longer, and decoding with fills where the uses rule alone allowed them was 2-4%
        slower than with none. On a GPU a one-token expert takes microseconds against the
        host's milliseconds, and the experts that recur within a decoding pay their move back in
        a few uses."""
        host = self.host(n)
        if host <= self.compute(n):
            return False
        device = self.compute(n) if self.lone is None else self.lone + self.per_token * (n - 1)
        saving = host - device
        return saving > 0 and uses_per_step * steps_left * saving > self.moving()

    def host(self, n: int) -> float:
        return float("inf") if self.host_overhead is None else _line(self.host_overhead, self.host_per_token, n)


def _line(overhead: float, per_token: float, n: int) -> float:
    """An expert's time for n tokens: overhead + n * per_token, nothing without tokens."""
    return overhead + per_token * n if n > 0 else 0.0
