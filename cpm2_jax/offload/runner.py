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
  the slot its demand load would, a history one only a free slot or (lfu) a colder entry's.
  Every guess is scored against what its layer then needs, and a kind of guess is acted on
  only while its running precision is at least `prefetch_precision` (a wrong guess costs a
  load, a dequantisation and an eviction; on the benchmark's random model both kinds are
  right 40-47% of the time over a decoding run, and its prefetch stops itself);
- int8 transfer (per-column scales, dequantised on the device once, at the expert's first
  computation: the slot then keeps float32 weights, so computations and cache hits never
  repeat it);
- a float expert arrives as its weights, each its own array (on the CPU, views of the link's
  staging buffer), so an expert call reads them in place;
- host compute (`host_compute`): an expert that is not on the device and whose few tokens
  cost less on the host than moving its weights (calibrated: host time(n) < load time b plus,
  int8, the dequantisation) runs
  on the host (`offload.host`: numpy in the dispatching thread, reading the host buffer where
  it lies, while the device computes the cached experts), its rows and output crossing the
  link instead of its weights (as InfMoE's CPU fallback / Fiddler). Same function of the same
  weights: outputs equal the device path's within float32 summation order. With a cache, a
  decoder layer's host-computed expert is also loaded behind its computation (a "fill": a
  free slot or, lfu, a colder entry's) where that pays (`CostModel.fill_pays`: its expected
  uses over the decoding steps left, each saving the host's time over the device's, outweigh
  one move), so the experts that recur move once and the rare ones never; where the host
  computes a few tokens as fast as the device (the CPU link model) nothing is filled.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import typing
from typing import Optional

import jax
import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.offload import host as H
from cpm2_jax.offload import schedule as S
from cpm2_jax.offload import split_moe
from cpm2_jax.offload.calibration import calibrate
from cpm2_jax.offload.calls import add_rows, dequantise, slot_step
from cpm2_jax.offload.options import CostModel, OffloadOptions, Stats, check_options
from cpm2_jax.offload.stepped import STACKS, SteppedModel
from cpm2_jax.offload.store import DeviceSlots, Expert, ExpertStore, Link


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


class _Release(typing.NamedTuple):
    """What the release thread waits for (`done`), then does by `kind`: "arrive" deletes
    `item` (an int8 buffer dequantised); "compute" unpins `item` (an expert's key) and
    records its span from `start`."""

    kind: str
    item: object
    done: object
    start: Optional[float] = None




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
        self._raw: set = set()  # int8 keys filled and not yet dequantised (or evicted)
        # the prefetch's guesses for a layer still to come {layer: (kind, experts)}, and each kind's
        # running precision (from 1: prefetching until its guesses prove poor)
        self._guesses: dict = {}
        self.precision = {"router": 1.0, "history": 1.0}
        # decoding steps left in the current greedy / beam call (a fill's horizon, `_fill_pays`)
        self._steps_left = 0
        self._first_decoder = next((key for key in self.order if key[0] == "decoder"), None)
        # the MoE layer met after each: the following one, and after the last the decoder's first
        # (the next decoding step's), not the encoder's
        after_last = self._first_decoder or self.order[0]
        self._next_layers = {key: self.order[i + 1] if i + 1 < len(self.order) else after_last
                             for i, key in enumerate(self.order)}
        self._error: Optional[BaseException] = None  # the transfer thread's failure
        self._booking: Optional[tuple] = None  # the last MoE layer's bookkeeping, still to do (`_book`)
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
        weights, ready = dequantise(buf, layout=self.store.layout, dtype=self.config.dtype)
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
        dequantised (prefetched, filled, or loaded for a later layer), once a layer is done
        (`_book`, as the next one starts): the device runs them between layers instead of at
        their first use. Under the slots' lock, so none is evicted (and deleted) meanwhile.
        Only the keys filled since the last call (`_raw`): a scan of every slot per layer took
        13% of a decoding step with all 128 experts resident."""
        if self.options.int8 and self._raw:
            with self._lock:
                keys, self._raw = self._raw, set()
            self.slots.exchange(self._dequantise_raw, keys=keys)

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
        next step's first layer, by how often it was needed) or a "fill" (an expert the host
        just computed, loaded behind it for the cache) only a free slot, an unused earlier
        prefetch's or (lfu) a colder entry's."""
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
        if self.options.int8:
            with self._lock:
                self._raw.add(key)
        with self._lock:
            st = self.stats
            st.loads += 1
            st.fills += int(prefetch == "fill")
            if prefetch in ("router", "history"):
                st.prefetches += 1
                self._prefetched.add(key)
            st.bytes_moved += self.store.expert_bytes
            st.transfer_time += end - start
            kind = "load" if prefetch is None else "fill" if prefetch == "fill" else "prefetch"
            st.timeline.append((kind, key, start, end))

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
        self._book()
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
    def _prefetch(self, stack: str, index: int, wanted: int, guess) -> None:
        """Queues the experts the next MoE layer will likely need that are not on the device (the
        transfer thread never waits for a slot for them, `_transfer`): those its router picks
        for this layer's input (`guess`, from the stepped model's lookahead; the
        most picked first, at most K), else - the next decoding step's first layer, whose input
        token is not known yet - the `wanted` (a step's rows x top-k) that layer has needed most
        often. Only while that kind of guess has been right often enough (`_score_guess`); the
        guess is kept either way, to be scored against what the layer needs."""
        nxt = self._next_layers[(stack, index)]
        if guess is None:
            kind, scores, limit = "history", self.frequency[nxt].tolist(), wanted
        else:
            kind, scores, limit = "router", np.asarray(guess).tolist(), self.options.device_experts
        # the highest first, ties by expert id (a stable sort; in Python: numpy's argsort cost
        # this per-layer step ~4x more in decoding)
        top = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:limit]
        experts = [e for e in top if scores[e] > 0]
        self._guesses[nxt] = (kind, experts)
        if self.precision[kind] < self.options.prefetch_precision:
            return
        for e in experts:
            if nxt + (e,) not in self.slots:
                self._transfers.put((nxt + (e,), kind, time.perf_counter()))

    def _score_guess(self, layer, active: list) -> None:
        """The share of the prefetch's guess for `layer` that it needed, into its kind's running
        precision (an exponential average over about twenty guesses: over ten, a guess right
        42-47% of the time crossed the 0.5 threshold back and forth)."""
        kind, experts = self._guesses.pop(layer, (None, ()))
        if experts:
            right = len(set(experts) & set(active))
            self.precision[kind] += 0.05 * (right / len(experts) - self.precision[kind])
            with self._lock:
                self.stats.guessed += len(experts)
                self.stats.guessed_right += right

    def _fill_pays(self, layer, e: int, n: int, routed) -> bool:
        """Whether expert e of a decoder layer, computed on the host now, is worth loading behind
        it for the cache (`CostModel.fill_pays`): its expected uses per step are its share of the
        layer's routing history times the experts a step picks (rows x top-k, at most 1)."""
        history = self.frequency[layer]
        total = int(history.sum())
        if not total or not self._steps_left:
            return False
        uses = min(1.0, history[e] / total * routed.shape[0] * self.config.moe_top_k)
        return self.cost.fill_pays(n, uses, self._steps_left)

    def _host_experts(self, layer, experts, routed, counts, starts, out) -> jax.Array:
        """`experts` computed on the host (`offload.host`, in this thread), each one's output rows
        added into `out` on the device: its rows come over once (one device-to-host read of
        the layer's rows), its outputs go back as one padded tile each."""
        rows = np.asarray(routed.rows)
        for e in experts:
            n, lo = int(counts[e]), int(starts[e])
            start = self._now()
            weights = H.host_weights(self.store.buffers[layer][e], self.store.layout)
            y = H.expert_rows(rows[lo:lo + split_moe.bucket(n)], weights, self.config.ffn_activation)
            # y as the call's argument: a device_put first (to the CPU device) queued its copy
            # behind the device's computations (0.36 ms a row of 256 against 0.1 ms for the call)
            out = add_rows(out, y, np.int32(lo), np.int32(n))
            with self._lock:
                self.stats.timeline.append(("host", layer + (e,), start, self._now()))
        return out

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
        self._book()  # the last layer's bookkeeping, while the device computes this one's routing
        counts = np.asarray(routed.counts)  # the one wait for the device before the experts
        self._settle()  # the earlier layers' computations are done (this layer's input needed them)
        begin = time.perf_counter()  # the lower bound's span: the experts, from their counts on
        counts = counts.tolist()  # Python ints: this layer's bookkeeping stays off numpy's per-call costs
        active = [e for e, n in enumerate(counts) if n]
        keys = {e: layer + (e,) for e in active}
        for e in active:
            self.slots.pin(keys[e])
        cached = [e for e in active if keys[e] in self.slots]
        host = [] if not opts.host_compute else [
            e for e in active if e not in cached and self.cost.host(counts[e]) < self.cost.moving()]
        if stack == "decoder" and layer == self._first_decoder:
            self._steps_left = max(0, self._steps_left - 1)  # the decoding steps after this one
        for e in host:
            self.slots.unpin(keys[e])
            if opts.cache != "none" and stack == "decoder" and self._fill_pays(layer, e, counts[e], routed):
                self._transfers.put((keys[e], "fill", time.perf_counter()))  # loaded behind its host computation
        device = [e for e in active if e not in host]
        streamed = [e for e in device if e not in cached]
        compute = [self.cost.compute(n) for n in counts] if streamed else None
        if opts.schedule == "infmoe" and streamed:
            order = S.infmoe_order(compute, self.cost.load, opts.device_experts, experts=device, resident=cached)
        else:  # in order; nothing to load: the cached experts in any order (each writes its own rows)
            order = cached + S.inorder(streamed)
        requested = time.perf_counter()
        for e in order:
            if e not in cached:
                self._transfers.put((keys[e], None, requested))
        frequency = self.frequency[layer]
        for e in active:
            frequency[e] += 1
        if opts.prefetch:
            self._score_guess(layer, active)
            self._prefetch(stack, index, wanted=routed.shape[0] * c.moe_top_k, guess=guess)
        starts = list(itertools.accumulate(counts, initial=0))  # each expert's first row (split_moe.offsets)
        waited = 0.0
        bound = None if not streamed else max(  # no load, no transfer to overlap
            sum(compute[e] for e in device) + sum(self.cost.host(counts[e]) for e in host),
            len(streamed) * self.cost.load)
        # A computation frees its slot when it is done. When the layer's experts outnumber the
        # K slots, a load may wait for a slot that one of them holds: the release thread sees
        # each finish (the waiting load takes the slot at once). Otherwise no load of this
        # layer waits for its computations: the layer returns without waiting for its experts,
        # and their slots are released once the next MoE layer has its counts (`_settle`: that
        # layer's input needed these computations) - no thread hand-off per expert and no wait
        # per layer: a decoding step waits for the device once per MoE layer, and the device
        # runs the next pieces while this thread waits for transfers.
        inline = [] if len(order) <= opts.device_experts else None
        on_host = list(host)  # computed before the first expert that may wait for its load
        for e in order:
            if on_host and e not in cached:  # the device has the cached experts' computations queued
                out, on_host = self._host_experts(layer, on_host, routed, counts, starts, out), []
            event = self.slots.event(keys[e])
            t = time.perf_counter()
            event.wait()
            if self._error is not None:
                raise RuntimeError(f"the transfer of expert {keys[e]} failed") from self._error
            waited += time.perf_counter() - t
            n = counts[e]
            out, done = slot_step(out, routed.rows, np.int32(starts[e]), np.int32(n), self._weights(keys[e]),
                                  tile=split_moe.bucket(n), activation=c.ffn_activation, dtype=c.dtype)
            if inline is None:
                self._releases.put(_Release("compute", keys[e], done, self._now()))
            else:
                inline.append((keys[e], self._now()))
        if on_host:  # every device expert was cached
            out = self._host_experts(layer, on_host, routed, counts, starts, out)
        if inline is None:
            out.block_until_ready()
            self._account(begin, bound)
        elif inline:
            self._deferred.append((inline, done, begin, bound))
        self._booking = (layer, [keys[e] for e in active], [keys[e] for e in cached], len(host), waited)
        return out

    def _book(self) -> None:
        """The last MoE layer's bookkeeping, done when the next one starts (`moe_rows` calls it
        before waiting for that layer's counts, while the device computes its routing, off the
        path from one layer's counts to its experts): the int8 experts arrived since dispatched
        for dequantisation, its stats, and (no cache) the experts prefetched for it and not
        used dropped."""
        if self._booking is None:
            return
        layer, active, cached, host, waited = self._booking
        self._booking = None
        self._dequantise_arrived()
        with self._lock:
            st = self.stats
            st.needed += len(active)
            st.hits += len(cached)
            st.prefetch_hits += sum(key in self._prefetched for key in cached)
            st.host_computes += host
            st.wait_time += waited
            st.layers += 1
            self._prefetched.difference_update(cached)
            stale = [key for key in self._prefetched if key[:2] == layer]  # prefetched for this layer, unused
        if self.options.cache == "none":
            for key in stale:
                if self.slots.drop(key):
                    self._prefetched.discard(key)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, reps: int = 3) -> CostModel:
        """The schedule's estimates, and what decides host compute and fills (`calibration`)."""
        return calibrate(self, reps)

    # ------------------------------------------------------------------ decoding
    def greedy(self, encoder_input_tokens, *, max_new_tokens: int, min_new_tokens: int = 0):
        self._steps_left = max_new_tokens
        out = self.model.greedy(encoder_input_tokens, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        self._settle()
        return out

    def beam_search(self, encoder_input_tokens, **kwargs):
        self._steps_left = kwargs["max_new_tokens"]
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
