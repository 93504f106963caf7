"""The InfMoE runner: an MoE model decoded with its experts in host memory and at most K of
them on the device, loads overlapped with expert computation (CPM2_FACTS "InfMoE").

Per MoE layer (`OffloadRunner.moe_rows`, called by the layer-stepped model between layers):
route on the device, read the token counts, order the experts with tokens (`schedule`:
InfMoE, or in order as the public release), then a transfer thread moves the missing experts
over the link in that order (each into a free slot, waiting for one when all K are in use)
while the main thread dispatches each expert's computation as soon as its weights are in
(XLA dispatch is asynchronous: nothing blocks but the wait for weights); a third thread sees
computations finish and frees their slots. Experts with no tokens never move.

Beyond InfMoE:
- an expert cache inside the K slots across layers and decoding steps: `lru`, or `lfu`
  (evict the expert its layer has needed least often so far: routing is skewed, so the hot
  experts of every layer stay);
- prefetch of the next MoE layer's likely experts: that layer's router applied to this layer's
  MoE input (computed in the same call as this layer's routing: in a trained model the residual
  stream changes little from one layer to the next), or, for the next decoding step's first layer (its token
  is not chosen yet), the experts that layer has needed most often; a router prefetch takes
  the slot its demand load would, a history one only a free slot or (lfu) a colder entry's;
- int8 transfer (per-column scales, dequantised on the device once, at the expert's first
  computation: the slot then keeps float32 weights, so computations and cache hits never
  repeat it);
- a float expert arrives as its weights, each its own array (on the CPU, views of the link's
  staging buffer), so an expert call reads them in place;
- host compute (`host_compute`): an expert that is not on the device and whose few tokens
  cost less on the host than moving its weights (calibrated: host time(n) < load time b) runs
  on the host (the CPU backend, reading the host buffer where it lies), its rows and output
  crossing the link instead of its weights (as InfMoE's CPU fallback / Fiddler). Same
  function of the same weights: outputs equal the device path.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
import typing
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import ModelConfig, dtype_of
from cpm2_jax.errors import ConfigError, check_choice
from cpm2_jax.offload import schedule as S
from cpm2_jax.offload import split_moe
from cpm2_jax.offload.stepped import STACKS, SteppedModel
from cpm2_jax.offload.store import DeviceSlots, Expert, ExpertStore, Layout, Link, dequantise, unpack

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
    host_computes: int = 0
    transfer_time: float = 0.0
    wait_time: float = 0.0  # the main thread waiting for weights
    # Over the MoE layers that load experts (a layer served by the cache has no transfer to overlap):
    moe_time: float = 0.0  # their wall time (token counts read to experts done)
    lower_bound: float = 0.0  # sum over them of max(sum of compute, sum of loads)
    layers: int = 0
    timeline: list = dataclasses.field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 0.0

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


def split_experts(config: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(params without expert weights, {(stack, layer): that layer's experts {name: [E, ...]}} as
    host arrays): the resident part and what the store keeps on the host."""
    import flax.linen as nn

    params = nn.meta.unbox(params)
    experts, resident = {}, {}
    for stack in STACKS:
        tree = dict(params[stack])
        n = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        if config.scan_layers:
            layers = dict(tree["layers"])
            if "moe" in layers:
                stacked = {k: np.asarray(v) for k, v in layers["moe"]["experts"].items()}
                for i in range(n):
                    experts[(stack, i)] = {k: v[i] for k, v in stacked.items()}
                layers["moe"] = {k: v for k, v in layers["moe"].items() if k != "experts"}
            tree["layers"] = layers
        else:
            for i in range(n):
                layer = dict(tree[f"layers_{i}"])
                if "moe" in layer:
                    experts[(stack, i)] = {k: np.asarray(v) for k, v in layer["moe"]["experts"].items()}
                    layer["moe"] = {k: v for k, v in layer["moe"].items() if k != "experts"}
                tree[f"layers_{i}"] = layer
        resident[stack] = tree
    for key in params:
        resident.setdefault(key, params[key])
    return resident, experts


@functools.partial(jax.jit, static_argnames=("tile", "activation", "dtype"), donate_argnums=(0,))
def _slot_step(out, rows, offset, count, weights, *, tile: int, activation: str, dtype: str):
    """One expert from the weights its slot holds; returns the updated output and a scalar that
    is ready when the computation is done."""
    out = split_moe.add_expert_output(out, rows, offset, count, weights, tile=tile, activation=activation,
                                      dtype=dtype_of(dtype))
    return out, out[0, 0]


@functools.partial(jax.jit, static_argnames=("activation", "dtype", "layout"))
def _packed_apply(window, buffer, *, activation: str, dtype: str, layout: Layout):
    """One expert on its rows `window` [tile, d] from its packed buffer: the host-compute path
    (runs where its arguments are: the host's CPU backend)."""
    weights = unpack(buffer, layout, dtype_of(dtype))
    return split_moe.expert_apply(window, weights, activation=activation, dtype=dtype_of(dtype)).astype(jnp.float32)


_add_rows = jax.jit(split_moe.add_rows, donate_argnums=(0,))  # a host-computed expert's output, on the device
@functools.partial(jax.jit, static_argnames=("layout", "dtype"))
def _dequantise(buffer, *, layout: Layout, dtype: str):
    """An int8 expert's float weights, and a flag ready with them (the release thread waits on
    the flag: the weights may be evicted, and deleted, before it looks)."""
    return dequantise(buffer, layout, dtype), buffer[0]


class _Release(typing.NamedTuple):
    """What the release thread waits for (`done`), then does by `kind`: "arrive" deletes
    `item` (an int8 buffer dequantised); "compute" unpins `item` (an expert's key) and
    records its span from `start`; "host" records a host-computed expert's span."""

    kind: str
    item: object
    done: object
    start: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Compute time of an expert with n tokens, overhead + n * per_token (seconds), and the load
    time of one expert (bytes / bandwidth): the schedule's c_i and b."""

    overhead: float
    per_token: float
    load: float
    host_overhead: Optional[float] = None  # the same on the host (None: not calibrated)
    host_per_token: float = 0.0

    def compute(self, n: int) -> float:
        return self.overhead + self.per_token * n if n > 0 else 0.0

    def host(self, n: int) -> float:
        if self.host_overhead is None:
            return float("inf")
        return self.host_overhead + self.host_per_token * n if n > 0 else 0.0


class OffloadRunner:
    """Decoding with the experts of `params` in host memory and `options.device_experts` slots."""

    def __init__(self, config: ModelConfig, params: dict, options: OffloadOptions, device=None,
                 cost: Optional[CostModel] = None, store: Optional[ExpertStore] = None, all_resident: bool = False):
        """`store`: another runner's host store of the same params (runners side by side share
        it: one copy of the experts in host memory), else one is built. `all_resident`: every
        expert of every layer put on the device once, outside the K slots and the link (the
        ceiling the benchmarks compare with: this runner's own code path, precision and int8
        dequantisation, with no transfer at all)."""
        check_options(config, options)
        self.config, self.options = config, options
        self.device = device or jax.devices()[0]
        self.host = jax.devices("cpu")[0]
        resident, experts = split_experts(config, params)
        if store is not None and (store.int8 != options.int8 or store.device != self.device):
            raise ValueError("a shared expert store must have the runner's int8 setting and device")
        self.store = store or ExpertStore(config, experts, int8=options.int8, device=self.device)
        self._split = None if options.int8 else self.store.layout  # float experts arrive split into weights
        self.model = SteppedModel(config, jax.device_put(resident, self.device), moe_rows=self.moe_rows,
                                  lookahead=options.prefetch)
        self.order = self.model.moe_layers()
        # How often each layer has needed each expert (the lfu cache's score, prefetch's guess).
        self.frequency = {key: np.zeros(config.num_experts, np.int64) for key in self.order}
        score = (lambda key: int(self.frequency[key[:2]][key[2]])) if options.cache == "lfu" else None
        self.all_resident = all_resident
        self.slots = DeviceSlots(len(self.order) * config.num_experts if all_resident else options.device_experts,
                                 score=score)
        # All-resident buffers are made as the streamed ones are (the link's aligned staging
        # copy, handed over in place on the CPU), at no modelled cost: like with like.
        place = Link(self.device, float("inf") if self.device.platform == "cpu" else None)
        for key in self.order if all_resident else ():
            for e, buf in enumerate(self.store.buffers[key]):
                self.slots.reserve(key + (e,))
                self.slots.fill(key + (e,), self._arrive(place.transfer(buf, split=self._split)))
        self.link = Link(self.device, options.bandwidth)
        self.stats = Stats()
        self._prefetched: set = set()
        self._error: Optional[BaseException] = None  # the transfer thread's failure
        # layers `moe_rows` returned from without waiting: ([(key, start)], last computation's flag,
        # perf_counter at their counts, lower bound or None) - `_settle` releases them
        self._deferred: list = []
        self._transfers: queue.Queue = queue.Queue()
        self._releases: queue.Queue = queue.Queue()
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._transfer_loop, self._release_loop)]
        for t in self._threads:
            t.start()
        self.cost = cost or self.calibrate()

    # ------------------------------------------------------------------ threads
    def _arrive(self, buf, wait: bool = True) -> Expert:
        """A transferred expert as its slot keeps it (`Expert`: its weights, each its own array;
        a float expert arrives so): int8 dequantised on the device, once (the
        transferred buffer then deleted: the paced link reuses its staging memory). With
        `wait=False` (the main thread, at the expert's first computation) the dequantisation is
        only dispatched: it runs in the device's order, before the expert's computations that
        read it, and the release thread deletes the int8 buffer once it is done."""
        if not self.options.int8:
            return buf
        weights, ready = _dequantise(buf, layout=self.store.layout, dtype=self.config.dtype)
        weights = Expert(weights)
        if wait:
            weights.block_until_ready()
            buf.delete()
        else:
            self._releases.put(_Release("arrive", buf, ready))
        return weights

    def _weights(self, key) -> dict:
        """The weights in `key`'s slot; an int8 expert just arrived is dequantised first (dispatched
        by this thread, the one that dispatches its computation: the link's thread only copies -
        a dispatch there waited for the GIL behind this thread's calls, and the link delivered a
        quarter of its set rate)."""
        self.slots.exchange(self._dequantise_raw, keys=[key])
        return self.slots.get(key).weights

    def _dequantise_raw(self, entry) -> Optional[Expert]:
        """A slot entry still int8 (a transferred buffer) -> its dequantisation, dispatched; None
        for an `Expert` already."""
        return None if isinstance(entry, Expert) else self._arrive(entry, wait=False)

    def _dequantise_arrived(self) -> None:
        """Dispatches the dequantisation of every int8 expert already in a slot but not yet
        dequantised (prefetched, or loaded for a later layer): the device runs them after this
        layer's computations, while this thread is between layers, instead of at their first
        use. Under the slots' lock, so none is evicted (and deleted) meanwhile."""
        if self.options.int8:
            self.slots.exchange(self._dequantise_raw)

    @property
    def _keep(self) -> bool:
        """Whether an expert stays in its slot once computed (a cache, or every expert resident)."""
        return self.options.cache != "none" or self.all_resident

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _transfer_loop(self):
        if self.options.link_cores:  # this thread only (Linux: pid 0 = the calling thread)
            os.sched_setaffinity(0, self.options.link_cores)
        while True:
            item = self._transfers.get()
            if item is None:
                return
            try:
                self._transfer(*item)
            except BaseException as exc:  # the main thread raises it instead of waiting forever
                self._error = exc
                self.slots.event(item[0]).set()
            finally:
                self._transfers.task_done()

    def _transfer(self, key, prefetch: Optional[str], requested: float):
        """Loads `key`: a demand load (`prefetch` None) into a free slot or the cache's victim's,
        waiting for one; a prefetch never waits. A "router" prefetch (the next layer's router
        picked it) takes the slot its demand load would take, earlier; a "history" one (the
        next step's first layer, by how often it was needed) only a free slot, an unused
        earlier prefetch's or (lfu) a colder entry's."""
        if key in self.slots:  # already there or on its way (an earlier prefetch)
            return
        if prefetch:
            def colder(victim):  # an unused prefetch for a layer that has passed, or (lfu) a colder entry
                if victim in self._prefetched and victim[:2] != key[:2]:
                    return True
                return self.options.cache == "lfu" and self.slots.score(victim) < self.slots.score(key)

            ready = self.slots.reserve(key, wait=False, evict=True if prefetch == "router" else colder)
            if ready is None:
                return
        else:
            ready = self.slots.reserve(key)
        buf = self.link.transfer(self.store.buffers[key[:2]][key[2]], ready=max(ready, requested), split=self._split)
        start, end = (t - self._t0 for t in self.link.last)
        self.slots.fill(key, buf)  # int8: dequantised by the main thread when first computed (`_weights`)
        with self._lock:
            st = self.stats
            st.loads += 1
            st.prefetches += int(prefetch is not None)
            if prefetch:
                self._prefetched.add(key)
            st.bytes_moved += self.store.expert_bytes
            st.transfer_time += end - start
            st.timeline.append(("prefetch" if prefetch else "load", key, start, end))

    def _release_loop(self):
        if self.options.link_cores:  # a host thread, like the link's: off the cores that compute
            os.sched_setaffinity(0, self.options.link_cores)
        while True:
            item = self._releases.get()
            if item is None:
                return
            kind, key, done, start = item
            try:
                done.block_until_ready()
            except BaseException as exc:  # the main thread raises it at its next wait for weights
                self._error = exc
                continue
            if kind == "arrive":  # an int8 expert dequantised: its transferred buffer can go
                key.delete()
                continue
            end = self._now()
            if kind == "compute":
                self.slots.unpin(key, keep=self._keep)
            with self._lock:
                self.stats.timeline.append((kind, key, start, end))

    def _settle(self) -> None:
        """Releases the slots of the layers `moe_rows` returned from without waiting: waits for
        each one's last computation (done already when called after a later layer's counts),
        then unpins its experts, records their spans and the layer's time (both ending when
        seen done: an overestimate by up to the next layer's attention)."""
        while self._deferred:
            inline, done, begin, bound = self._deferred.pop(0)
            done.block_until_ready()
            end = self._now()
            for key, _ in inline:
                self.slots.unpin(key, keep=self._keep)
            with self._lock:
                self.stats.timeline.extend(("compute", key, start, end) for key, start in inline)
            self._account(begin, bound)

    def _account(self, begin: float, bound: Optional[float]) -> None:
        """A layer that loaded experts, done now: its time from its counts on, and its lower bound."""
        if bound is not None:
            with self._lock:
                self.stats.moe_time += time.perf_counter() - begin
                self.stats.lower_bound += bound

    def close(self) -> None:
        self._settle()
        self._transfers.put(None)
        self._releases.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.slots.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ one MoE layer
    def _next_layer(self, stack: str, index: int):
        """The MoE layer met next: the following one, and after the last the decoder's first
        (the next decoding step), not the encoder's."""
        i = self.order.index((stack, index))
        if i + 1 < len(self.order):
            return self.order[i + 1]
        return next((key for key in self.order if key[0] == "decoder"), self.order[0])

    def _prefetch(self, stack: str, index: int, wanted: int, guess) -> None:
        """Queues the experts the next MoE layer will likely need that are not on the device (the
        transfer thread never waits for a slot for them, `_transfer`): those its router picks
        for this layer's input (`guess`, from the stepped model's lookahead; the
        most picked first, at most K), else - the next decoding step's first layer, whose input
        token is not known yet - the `wanted` (a step's rows x top-k) that layer has needed most often."""
        nxt = self._next_layer(stack, index)
        score = self.frequency[nxt] if guess is None else np.asarray(guess)
        for e in np.argsort(-score, kind="stable")[:wanted if guess is None else self.options.device_experts]:
            key = nxt + (int(e),)
            if score[e] > 0 and key not in self.slots:
                self._transfers.put((key, "history" if guess is None else "router", time.perf_counter()))

    def moe_ffn(self, stack: str, index: int, h: jax.Array) -> jax.Array:
        """One MoE layer's output for its FFN input h [B, L, d]: route, the experts, combine."""
        routed = split_moe.route(self.config, self.model.moe_params(stack, index)["router"], h)
        out = self.moe_rows(stack, index, routed, split_moe.empty_output(routed))
        out = split_moe.combine(out, routed, self.config.dtype).block_until_ready()
        self._settle()
        return out

    def moe_rows(self, stack: str, index: int, routed: split_moe.RoutedTokens, out: jax.Array,
                 guess: Optional[jax.Array] = None) -> jax.Array:
        """The experts' output rows of one routed MoE layer (the layer-stepped model's `moe_rows`):
        the token counts read once, the experts loaded and computed in the schedule's order;
        `guess` (with prefetch): the next MoE layer's router on this layer's input."""
        c, opts = self.config, self.options
        layer = (stack, index)
        counts = np.asarray(routed.counts)  # the one wait for the device before the experts
        self._settle()  # the earlier layers' computations are done (this layer's input needed them)
        begin = time.perf_counter()  # the lower bound's span: the experts, from their counts on
        active = [e for e in range(c.num_experts) if counts[e] > 0]
        keys = {e: layer + (e,) for e in active}
        for e in active:
            self.slots.pin(keys[e])
        cached = [e for e in active if keys[e] in self.slots]
        compute = [self.cost.compute(int(n)) for n in counts]
        host = [] if not opts.host_compute else [
            e for e in active if e not in cached and self.cost.host(int(counts[e])) < self.cost.load]
        for e in host:
            self.slots.unpin(keys[e])
        device = [e for e in active if e not in host]
        if opts.schedule == "infmoe":
            order = S.infmoe_order(compute, self.cost.load, opts.device_experts, experts=device, resident=cached)
        else:
            order = cached + S.inorder([e for e in device if e not in cached])
        requested = time.perf_counter()
        for e in order:
            if e not in cached:
                self._transfers.put((keys[e], None, requested))
        self.frequency[layer][active] += 1
        if opts.prefetch:
            self._prefetch(stack, index, wanted=routed.shape[0] * c.moe_top_k, guess=guess)
        starts = split_moe.offsets(counts)
        kw = dict(activation=c.ffn_activation, dtype=c.dtype, layout=self.store.layout)  # the host's copy as stored
        if host:  # first: they need no load, so they hide the first one
            rows = np.asarray(routed.rows)
            for e in host:
                n, lo = int(counts[e]), int(starts[e])
                tile = split_moe.bucket(n)
                start = self._now()
                window = jax.device_put(rows[lo:lo + tile], self.host)
                y = _packed_apply(window, jax.device_put(self.store.buffers[layer][e], self.host), **kw)
                out = _add_rows(out, jax.device_put(y, self.device), np.int32(lo), np.int32(n))
                self._releases.put(_Release("host", keys[e], y, start))
        waited = 0.0
        streamed = len(device) - len(cached)
        bound = None if streamed == 0 else max(  # no load, no transfer to overlap
            sum(compute[e] for e in device) + sum(self.cost.host(int(counts[e])) for e in host),
            streamed * self.cost.load)
        # A computation frees its slot when it is done. When the layer's experts outnumber the
        # K slots, a load may wait for a slot that one of them holds: the release thread sees
        # each finish (the waiting load takes the slot at once). Otherwise no load of this
        # layer waits for its computations: the layer returns without waiting for its experts,
        # and their slots are released once the next MoE layer has its counts (`_settle`: that
        # layer's input needed these computations) - no thread hand-off per expert and no wait
        # per layer: a decoding step waits for the device once per MoE layer, and the device
        # runs the next pieces while this thread waits for transfers.
        inline = [] if len(order) <= opts.device_experts else None
        for e in order:
            event = self.slots.event(keys[e])
            t = time.perf_counter()
            event.wait()
            if self._error is not None:
                raise RuntimeError(f"the transfer of expert {keys[e]} failed") from self._error
            waited += time.perf_counter() - t
            n = int(counts[e])
            out, done = _slot_step(out, routed.rows, np.int32(starts[e]), np.int32(n), self._weights(keys[e]),
                                   tile=split_moe.bucket(n), activation=c.ffn_activation, dtype=c.dtype)
            if inline is None:
                self._releases.put(_Release("compute", keys[e], done, self._now()))
            else:
                inline.append((keys[e], self._now()))
        self._dequantise_arrived()
        if inline is None:
            out.block_until_ready()
            self._account(begin, bound)
        elif inline:
            self._deferred.append((inline, done, begin, bound))
        with self._lock:
            st = self.stats
            st.needed += len(active)
            st.hits += len(cached)
            st.prefetch_hits += sum(keys[e] in self._prefetched for e in cached)
            self._prefetched.difference_update(keys[e] for e in cached)
            stale = [key for key in self._prefetched if key[:2] == layer]  # prefetched for this layer, unused
        if opts.cache == "none":
            for key in stale:
                if self.slots.drop(key):
                    self._prefetched.discard(key)
        with self._lock:
            st = self.stats
            st.host_computes += len(host)
            st.wait_time += waited
            st.layers += 1
        return out

    # ------------------------------------------------------------------ calibration
    def calibrate(self, reps: int = 3) -> CostModel:
        """Times one transfer over the link and one expert on 1 and 64 tokens (weights on the
        device; and on the host when `host_compute`): the schedule's estimates."""
        c = self.config
        key = next(iter(self.store.buffers))
        host_buf = self.store.buffers[key][0]
        buf = self.link.transfer(host_buf, split=self._split)
        start = time.perf_counter()
        for _ in range(reps):
            buf.delete()  # its buffer goes back to the link's pool
            buf = self.link.transfer(host_buf, split=self._split)
        load = (time.perf_counter() - start) / reps
        weights = self._arrive(buf)
        kw = dict(activation=c.ffn_activation, dtype=c.dtype)

        def device_run(n):
            rows = jnp.zeros((2 * n, c.d_model), jnp.float32)
            return _slot_step(jnp.zeros_like(rows), rows, np.int32(0), np.int32(n), weights.weights, tile=n, **kw)[1]

        def host_run(n):
            window = jax.device_put(np.zeros((n, c.d_model), np.float32), self.host)
            return _packed_apply(window, jax.device_put(host_buf, self.host), layout=self.store.layout, **kw)

        def line(run):
            times = {}
            for n in (1, 64):
                run(n).block_until_ready()
                start = time.perf_counter()
                for _ in range(reps):
                    run(n).block_until_ready()
                times[n] = (time.perf_counter() - start) / reps
            per_token = max(0.0, (times[64] - times[1]) / 63)
            return max(times[1] - per_token, 0.0), per_token

        overhead, per_token = line(device_run)
        host_overhead, host_per_token = line(host_run) if self.options.host_compute else (None, 0.0)
        weights.delete()
        self.link.reset_counters()
        return CostModel(overhead=overhead, per_token=per_token, load=load, host_overhead=host_overhead,
                         host_per_token=host_per_token)

    # ------------------------------------------------------------------ decoding
    def greedy(self, encoder_input_tokens, *, max_new_tokens: int, min_new_tokens: int = 0):
        out = self.model.greedy(encoder_input_tokens, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        self._settle()
        return out

    def beam_search(self, encoder_input_tokens, **kwargs):
        out = self.model.beam_search(encoder_input_tokens, **kwargs)
        self._settle()
        return out

    def reset_stats(self) -> None:
        self._settle()
        with self._lock:
            self.stats = Stats()
            self.link.reset_counters()

    def empty_slots(self) -> None:
        """Waits for queued transfers (prefetches) to land, then empties every slot (a cold start;
        the routing frequencies are kept). All-resident: nothing to empty."""
        self._settle()
        self._transfers.join()
        if self.all_resident:
            return
        self.slots.clear()
        self._prefetched.clear()
