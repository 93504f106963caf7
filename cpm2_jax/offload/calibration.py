"""Calibration of the offload runner's cost model (`options.CostModel`): what one load, one
expert's computation on the device and on the host, and an int8 expert's dequantisation cost,
measured as decoding spends them."""
from __future__ import annotations

import functools
import itertools
import time

import jax
import numpy as np

from cpm2_jax.offload import host as H
from cpm2_jax.offload.calls import add_rows, dequantise, slot_step
from cpm2_jax.offload.options import CostModel
from cpm2_jax.offload.store import Link


def calibrate(runner, reps: int = 3) -> CostModel:
    """An `OffloadRunner`'s costs on its link, store, device and options. Times one transfer
    over the link, and one expert on 1 and 64 tokens on the device (and on the host when
    `host_compute`) and an int8 expert's dequantisation, each per call in a stream of
    `4 * reps` calls, as the dispatching thread and the device spend them in a layer of many
    experts; and a one-token expert alone on inputs ready, as a decoding step issues it (the
    cost a cache hit saves a fill against the host): the schedule's estimates, and what
    decides host compute and fills."""
    c = runner.config
    key = next(iter(runner.store.buffers))
    host_buf = runner.store.buffers[key][0]
    buf = runner.link.transfer(host_buf, split=runner._split)
    start = time.perf_counter()
    for _ in range(reps):
        buf.delete()  # its buffer goes back to the link's pool
        buf = runner.link.transfer(host_buf, split=runner._split)
    load = (time.perf_counter() - start) / reps
    weights = runner._arrive(buf)
    # more of the layer's experts (K in all, as the slots allow), taken in turn like the host's:
    # their weights as cold in the caches as the cache's many entries are in decoding (four
    # experts of d_ff 2048, 25 MB, sat in a CPU's last-level cache and timed the device's
    # one-token expert at 0.45-0.89 ms from one calibration to the next, against the host's
    # 0.73 ms from memory: whether fills paid then changed from run to run)
    place = Link(runner.device, float("inf") if runner.device.platform == "cpu" else None)
    cycle = [weights] + [runner._arrive(place.transfer(b, split=runner._split))
                         for b in runner.store.buffers[key][1:runner.options.device_experts]]
    kw = dict(activation=c.ffn_activation, dtype=c.dtype)

    def zeros(rows):
        # committed to the device, as a jitted call's outputs are (an uncommitted first argument
        # made the second call compile again, inside the timed stream)
        return jax.device_put(np.zeros((rows, c.d_model), np.float32), runner.device)

    device_state = {n: [zeros(2 * n), zeros(2 * n)] for n in (1, 64)}
    device_experts = itertools.cycle(cycle)

    def device_run(n):  # as `moe_rows` issues them: the rows made once, the output threaded through
        rows, out = device_state[n]
        out, flag = slot_step(out, rows, np.int32(0), np.int32(n), next(device_experts).weights, tile=n, **kw)
        device_state[n][1] = out
        return flag

    host_state = {"out": zeros(64)}
    host_buffers = itertools.cycle(runner.store.buffers[key])

    def host_run(n):  # as `_host_experts`: the layer's experts in turn (their weights cold in the caches)
        y = H.expert_rows(np.zeros((n, c.d_model), np.float32), H.host_weights(next(host_buffers), runner.store.layout),
                          c.ffn_activation)
        host_state["out"] = add_rows(host_state["out"], y, np.int32(0), np.int32(n))
        return host_state["out"]

    def timed(run, calls):
        run()
        run().block_until_ready()  # compiled, for its arguments as the stream passes them
        start = time.perf_counter()
        for _ in range(calls - 1):
            run()
        run().block_until_ready()
        return (time.perf_counter() - start) / calls

    def line(run, calls):
        times = {n: timed(functools.partial(run, n), calls) for n in (1, 64)}
        per_token = max(0.0, (times[64] - times[1]) / 63)
        return max(times[1] - per_token, 0.0), per_token

    overhead, per_token = line(device_run, 4 * reps)

    def issued(run, calls):  # the dispatching thread's time for a call on ready inputs (not waited for)
        spent = 0.0
        run().block_until_ready()
        for _ in range(calls):
            start = time.perf_counter()
            flag = run()
            spent += time.perf_counter() - start
            flag.block_until_ready()
        return spent / calls

    # A decoding step's cache hit: issued on ready inputs (its layer's counts were read), it
    # costs the step the dispatching thread's time to issue it while the device's run overlaps
    # what that thread does next (measured in decoding: a host-computed one-token expert made a
    # step ~0.55 ms longer than a hit, where the stream calibrates the two 0.5 and 0.3 ms apart)
    lone = issued(functools.partial(device_run, 1), 4 * reps)
    host_overhead, host_per_token = line(host_run, 4 * reps) if runner.options.host_compute else (None, 0.0)
    arrive = 0.0
    if runner.options.int8:
        packed = jax.device_put(host_buf, runner.device)
        arrive = timed(lambda: dequantise(packed, layout=runner.store.layout, dtype=c.dtype)[1], 4 * reps)
    for expert in cycle:
        expert.delete()
    runner.link.reset_counters()
    return CostModel(overhead=overhead, per_token=per_token, load=load, host_overhead=host_overhead,
                     host_per_token=host_per_token, arrive=arrive, lone=lone)
