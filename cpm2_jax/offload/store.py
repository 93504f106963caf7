"""Expert weights in host memory, the link that moves them, and the K device slots they land in.

- `pack_expert`: one expert's weights (its RMSNorm scale and FFN matrices) in one contiguous
  host buffer, so a load is one transfer; `--int8` packs the matrices as int8 with one float32
  scale per output column (BMInf's per-row scales of W^T), dequantised on the device
  (`unpack`, inside the expert's jitted computation).
- `ExpertStore`: every MoE layer's experts packed, in `pinned_host` memory where the platform
  has that memory kind apart from the device's (GPUs); numpy buffers otherwise.
- `Link`: host -> device. `bandwidth=None` is the real link (`device_put` from pinned host
  memory); a bandwidth in bytes/s is the link model for machines whose host and device are one
  RAM (CPU): a copy thread paced to that rate, so that scheduling is measured honestly.
- `DeviceSlots`: at most K expert buffers on the device at any time (counted: `peak`), LRU
  among those not in use; an evicted buffer is deleted before another load takes its slot, so
  the allocator reuses the same memory.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import ModelConfig, dtype_of

_F32 = 4
ALIGN = 64  # bytes: where the CPU runtime takes a host array in place (dlpack) rather than copying it


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple
    kind: str  # "float" (the buffer's dtype), "int8" (bytes) or "f32" (4-byte groups)
    offset: int  # in buffer elements
    size: int  # in buffer elements
    scale: Optional[str] = None  # int8: the entry holding its column scales


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each weight sits in a packed expert buffer of `dtype` and `total` elements."""

    entries: tuple
    dtype: str
    total: int

    @property
    def nbytes(self) -> int:
        return self.total * np.dtype(self.dtype).itemsize


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., n] -> (int8 q, float32 scale [n]) with w ~ q * scale, scale = max|w[:, j]| / 127."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def pack_expert(weights: dict, int8: bool = False) -> tuple[np.ndarray, Layout]:
    """One contiguous buffer holding `weights` {name: array}; int8: matrices quantised per column."""
    names = sorted(weights)
    if not int8:
        dtype = np.result_type(*[np.asarray(weights[n]).dtype for n in names])
        parts, entries, off = [], [], 0
        align = max(1, ALIGN // np.dtype(dtype).itemsize)
        for n in names:
            a = np.asarray(weights[n], dtype).ravel()
            pad = (-off) % align  # each weight starts on a 64-byte boundary: a slot's view of it is in place
            if pad:
                parts.append(np.zeros(pad, dtype))
                off += pad
            entries.append(Entry(n, tuple(np.shape(weights[n])), "float", off, a.size))
            parts.append(a)
            off += a.size
        return np.concatenate(parts), Layout(tuple(entries), np.dtype(dtype).name, off)
    chunks, entries, off = [], [], 0

    def put(name, shape, kind, data: np.ndarray, scale=None):
        nonlocal off
        raw = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        pad = (-off) % _F32  # float groups start on a 4-byte boundary
        if pad:
            chunks.append(np.zeros(pad, np.uint8))
            off += pad
        entries.append(Entry(name, tuple(shape), kind, off, raw.size, scale))
        chunks.append(raw)
        off += raw.size

    for n in names:
        w = np.asarray(weights[n])
        if w.ndim >= 2:
            q, scale = quantize_columns(w)
            put(n, w.shape, "int8", q, scale=f"{n}/scale")
            put(f"{n}/scale", scale.shape, "f32", scale)
        else:
            put(n, w.shape, "f32", w.astype(np.float32))
    return np.concatenate(chunks), Layout(tuple(entries), "uint8", off)


def _jax_bitcast(part: jax.Array, dtype) -> jax.Array:
    width = np.dtype(dtype).itemsize
    return jax.lax.bitcast_convert_type(part.reshape(-1, width) if width > 1 else part, dtype)


def _numpy_bitcast(part: np.ndarray, dtype) -> np.ndarray:
    return part.view(dtype)  # a view: nothing copied


def entries(buffer, layout: Layout, bitcast=_jax_bitcast) -> dict:
    """{name: the entry as stored, in its shape} of a packed buffer: float weights, int8
    matrices (q) and their float32 column scales ("<name>/scale"). `bitcast(part, dtype)`
    reads bytes as dtype: JAX's (traceable) by default, numpy's views for a host array."""
    raw = {}
    for e in layout.entries:
        part = buffer[e.offset:e.offset + e.size]
        if e.kind == "int8":
            part = bitcast(part, np.int8)
        elif e.kind == "f32":
            part = bitcast(part, np.float32)
        raw[e.name] = part.reshape(e.shape)
    return raw


def numpy_entries(buffer, layout: Layout) -> dict:
    """`entries` of a host buffer as numpy views (the host-compute path reads them in place)."""
    return entries(np.asarray(buffer), layout, _numpy_bitcast)


def unpack(buffer: jax.Array, layout: Layout, dtype=jnp.float32) -> dict:
    """The weights {name: array} of a packed buffer, int8 matrices dequantised w = q * column
    scale (traceable: runs inside the expert's jit)."""
    raw = entries(buffer, layout)
    out = {}
    for e in layout.entries:
        if e.name.endswith("/scale"):
            continue
        if e.kind == "int8":
            out[e.name] = (raw[e.name].astype(jnp.float32) * raw[e.scale]).astype(dtype)
        else:
            out[e.name] = raw[e.name]
    return out


class Expert:
    """One expert as a device slot keeps it: its weights {name: array} at the compute dtype,
    each its own array (an expert call reads them in place; slicing one packed buffer inside
    the call copied every matrix first: 0.37 ms against 0.11 ms for a one-token expert of
    d 256 x 1024 on the CPU). Deleting it deletes every weight."""

    def __init__(self, weights: dict):
        self.weights = weights

    def delete(self) -> None:
        for w in self.weights.values():
            w.delete()

    def is_deleted(self) -> bool:
        return all(w.is_deleted() for w in self.weights.values())

    def block_until_ready(self) -> "Expert":
        jax.block_until_ready(self.weights)
        return self


def dequantise(buffer: jax.Array, layout: Layout, dtype="float32") -> dict:
    """A packed int8 expert -> its weights {name: array of `dtype`} (w = q * column scale, as
    `unpack` computes it; traceable: jit it on the device, once per load, so every
    computation of the expert - a cache hit included - reads float weights)."""
    return unpack(buffer, layout, dtype_of(dtype))


_unpack = jax.jit(unpack, static_argnames=("layout", "dtype"))


def _split_on_device(packed: jax.Array, split: Optional[Layout]):
    """A transferred packed buffer as it is handed over: itself, or (`split`) an `Expert` of its
    weights unpacked on the device (the packed buffer then deleted)."""
    if split is None:
        return packed
    out = Expert(_unpack(packed, layout=split, dtype=split.dtype)).block_until_ready()
    packed.delete()
    return out


def host_memory_kind(device) -> Optional[str]:
    """`pinned_host` where the device has it as a memory apart from its own (GPU/TPU); None on
    the CPU, where every memory kind is the same RAM."""
    if device.platform == "cpu":
        return None
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


class ExpertStore:
    """Every MoE layer's experts packed in host memory: `buffers[(stack, layer)][e]`."""

    def __init__(self, config: ModelConfig, moe_layers: dict, *, int8: bool = False, device=None):
        """moe_layers: {(stack, layer): the layer's stacked expert weights {name: [E, ...]}}."""
        self.config, self.int8 = config, int8
        self.device = device or jax.devices()[0]
        self.memory_kind = host_memory_kind(self.device)
        self.buffers, self.layout = {}, None
        for key, experts in moe_layers.items():
            host = {n: np.asarray(a) for n, a in experts.items()}
            row = []
            for e in range(config.num_experts):
                buf, layout = pack_expert({n: a[e] for n, a in host.items()}, int8=int8)
                self.layout = layout
                if self.memory_kind:
                    buf = jax.device_put(buf, jax.sharding.SingleDeviceSharding(self.device,
                                                                                memory_kind=self.memory_kind))
                row.append(buf)
            self.buffers[key] = row

    @property
    def expert_bytes(self) -> int:
        return self.layout.nbytes


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data starts on an `align`-byte boundary (what the CPU
    runtime needs to use it in place, without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class Link:
    """Host -> device transfers of packed experts: the real link, or a paced copy (`bandwidth`
    bytes/s) where host and device share one RAM.

    The paced link is a server of fixed rate: a transfer starts when the link is free and its
    request has come (`ready`, the time its slot freed up), and ends at the deadline
    start + bytes / bandwidth. The bytes really move: one memcpy (numpy's copy, run without the
    GIL) into a staging buffer of a pool allocated once and reused (at most as many as buffers
    are alive: K in the runner). On the CPU that buffer *is* the device buffer (one RAM): it is
    handed over zero-copy (dlpack), not through `device_put`, whose copy runs in the runtime's
    thread pool behind the computations and took ~15x the memcpy (measured: the link then
    delivered 17% of its set rate). Then the thread sleeps until the deadline - no CPU burnt,
    as a DMA engine would not burn the compute units' - so computation and transfer overlap.
    A late wake-up of the thread (GIL, a busy machine) delays that one hand-over but never the
    link's clock: the next transfer still starts at the deadline. `achieved_bandwidth`
    (bytes / time from start to the hand-over) says how closely the thread kept to the set rate."""

    def __init__(self, device, bandwidth: Optional[float] = None):
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"link bandwidth must be > 0 bytes/s, got {bandwidth}")
        self.device, self.bandwidth = device, bandwidth
        self.sharding = jax.sharding.SingleDeviceSharding(device)
        self._free_at = 0.0  # perf_counter time at which the modelled link is next free
        self._pool: list = []  # [staging buffer, the array handed over from it (None: never)]
        self.bytes = 0
        self.busy = 0.0  # sum over transfers of hand-over - start (s)
        self.copy_time = 0.0  # sum of the memcpy times (paced link: the CPU the link costs)
        self.last = (0.0, 0.0)  # perf_counter start and hand-over of the latest transfer

    def reset_counters(self) -> None:
        self.bytes, self.busy, self.copy_time = 0, 0.0, 0.0

    @property
    def achieved_bandwidth(self) -> float:
        """bytes / s actually delivered while transferring (the set rate when the thread keeps up)."""
        return self.bytes / self.busy if self.busy else 0.0

    def _staging(self, src: np.ndarray) -> list:
        """A pooled buffer of src's shape and dtype whose handed-over array has been deleted (its
        slot evicted: nothing reads it any more), or a new one."""
        for entry in self._pool:
            buf, out = entry
            if buf.shape == src.shape and buf.dtype == src.dtype and (out is None or out.is_deleted()):
                return entry
        entry = [aligned_empty(src.shape, src.dtype), None]
        self._pool.append(entry)
        return entry

    def transfer(self, buffer, ready: Optional[float] = None, split: Optional[Layout] = None):
        """Moves one buffer and returns it on the device once it is there (blocking). `ready`:
        perf_counter time from which the transfer could start (default: now). `split`: the
        buffer's float layout; the result is then an `Expert` of its weights (on the CPU views
        of the staging buffer, in place; elsewhere unpacked on the device, one copy at HBM
        speed). The caller deletes the result when done with it (the paced link then reuses
        its buffer)."""
        now = time.perf_counter()
        start = max(self._free_at, now if ready is None else min(ready, now))
        if self.bandwidth is None:
            start = now
            out = _split_on_device(jax.device_put(buffer, self.sharding).block_until_ready(), split)
        else:
            src = np.asarray(buffer)
            deadline = start + src.nbytes / self.bandwidth
            self._free_at = deadline
            entry = self._staging(src)
            t = time.perf_counter()
            np.copyto(entry[0], src)  # a plain memcpy: numpy runs it without the GIL
            self.copy_time += time.perf_counter() - t
            if self.device.platform == "cpu":  # in place: the staging buffer is device memory
                if split is None:
                    out = jax.dlpack.from_dlpack(entry[0])
                else:
                    out = Expert({e.name: jax.dlpack.from_dlpack(entry[0][e.offset:e.offset + e.size].reshape(e.shape))
                                  for e in split.entries})
            else:  # a modelled link on an accelerator: the runtime's copy, then the pacing
                out = _split_on_device(jax.device_put(entry[0], self.sharding).block_until_ready(), split)
            entry[1] = out
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        end = time.perf_counter()
        if self.bandwidth is None:
            self._free_at = end
        self.bytes += int(np.prod(np.shape(buffer))) * np.dtype(buffer.dtype).itemsize
        self.busy += end - start
        self.last = (start, end)
        return out


class DeviceSlots:
    """At most `k` expert buffers on the device, counted from the moment a slot is reserved for
    a load (the buffer being filled counts) to its eviction: `peak` never exceeds k. Keys are
    (stack, layer, expert); an entry is pinned while its layer needs it; unpinned entries stay
    (a cache) until evicted, or are dropped at once with `keep=False`. The victim is the
    unpinned entry with the lowest `score(key)` (default: none, i.e. least recently used first;
    ties go to the least recently used)."""

    def __init__(self, k: int, score=None):
        if k < 1:
            raise ValueError(f"need at least one device slot, got {k}")
        self.k = k
        self.score = score
        self.entries: collections.OrderedDict = collections.OrderedDict()  # key -> buffer | None (loading)
        self.pins: collections.Counter = collections.Counter()
        self.events: dict = {}  # key -> threading.Event, set once its buffer is on the device
        self.loaded: set = set()
        self.cond = threading.Condition()
        self.peak = 0
        self.evictions = 0
        self.freed_at = 0.0  # perf_counter time the last slot was freed (a waiting load's start)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def live(self) -> int:
        return len(self.entries)

    def free(self) -> int:
        return self.k - len(self.entries)

    def pin(self, key) -> None:
        with self.cond:
            self.pins[key] += 1
            if key in self.entries:
                self.entries.move_to_end(key)

    def unpin(self, key, keep: bool = True) -> None:
        with self.cond:
            self.pins[key] -= 1
            if self.pins[key] <= 0:
                del self.pins[key]
                if not keep and key in self.loaded:
                    self._evict(key)
                self.freed_at = time.perf_counter()
            self.cond.notify_all()

    def _evict(self, key) -> None:
        buf = self.entries.pop(key)
        self.loaded.discard(key)
        self.events.pop(key, None)
        if buf is not None:
            buf.delete()
        self.evictions += 1

    def drop(self, key) -> bool:
        """Evicts `key` now if it is on the device and unpinned (an unused prefetch)."""
        with self.cond:
            if key not in self.loaded or key in self.pins:
                return False
            self._evict(key)
            self.freed_at = time.perf_counter()
            self.cond.notify_all()
            return True

    def victim(self):
        """The entry a new load would replace (None when every entry is pinned or loading)."""
        with self.cond:
            candidates = [key for key in self.entries if key not in self.pins and key in self.loaded]
            if not candidates:
                return None
            if self.score is None:
                return candidates[0]  # least recently used first
            return min(candidates, key=self.score)  # min keeps the LRU among equal scores

    def reserve(self, key, wait: bool = True, evict=True) -> Optional[float]:
        """A slot for `key`: a free one, else (`evict` True, or a predicate on the victim's key)
        the victim's; blocks until one frees up unless `wait` is False (then returns None).
        Returns the perf_counter time from which the slot was available (0.0: it was free or
        evictable all along)."""
        with self.cond:
            waited = False
            while len(self.entries) >= self.k:
                victim = self.victim()
                if victim is not None and (evict is True or (evict and evict(victim))):
                    self._evict(victim)
                    break
                if not wait:
                    return None
                waited = True
                self.cond.wait()
            self.entries[key] = None
            self.events.setdefault(key, threading.Event())
            self.peak = max(self.peak, len(self.entries))
            return self.freed_at if waited else 0.0

    def fill(self, key, buffer) -> None:
        with self.cond:
            if key not in self.entries:  # dropped while on its way (clear): nothing to keep
                buffer.delete()
                return
            self.entries[key] = buffer
            self.loaded.add(key)
            self.events[key].set()
            self.cond.notify_all()

    def exchange(self, convert, keys) -> None:
        """Replaces each loaded entry `b` of `keys` for which `convert(b)` is not None by that
        value (an int8 expert by its dequantised weights), under the lock, so none is evicted
        meanwhile; the slots' count is unchanged. Keys not loaded (evicted, or still on their
        way) are skipped."""
        with self.cond:
            for key in keys:
                new = convert(self.entries[key]) if key in self.loaded else None
                if new is not None:
                    self.entries[key] = new

    def event(self, key) -> threading.Event:
        """Set once `key`'s buffer is on the device (may be asked for before its load starts)."""
        with self.cond:
            event = self.events.get(key)
            if event is None:  # made only when missing (an Event costs more than the lookup)
                event = self.events[key] = threading.Event()
            return event

    def get(self, key):
        with self.cond:
            self.entries.move_to_end(key)
            return self.entries[key]

    def clear(self) -> None:
        with self.cond:
            for key in list(self.entries):
                self._evict(key)
            self.evictions = 0
