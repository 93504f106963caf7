"""The InfMoE schedule (CPM2_FACTS "InfMoE"): the order in which one MoE layer's experts are
loaded and computed so that loads hide behind computation with at most K experts on the device.

Model (what the runner does): one link moves expert weights in the chosen order, one at a time;
one compute stream runs the experts in the same order. A slot is held from the start of its
expert's load to the end of its computation; experts already on the device (`resident`, the
cache) hold theirs from time 0 and load in no time. With c_i the compute time of the expert at
position i, b its load time and P_j = c_1 + ... + c_j, loads back to back end at t*b, so:

    (A) loads hidden:        P_{t-1} >= (t-1) b       for t = 2..T  (expert t's weights are in
                                                                      before expert t-1 ends)
    (B) at most K resident:  P_{t-1} <= (t+K-3) b     for t = 2..T-K+1 (the link never waits
                                                                      for a slot)

(CPM2_FACTS writes (B) as P_{t-1} <= (t+K-1) b, counting the slot being filled and the one being
computed outside K; here every buffer on the device counts.) When both hold, every expert but
the first starts the moment the previous one ends: makespan b + sum c, the optimum. Finding such
an order is a band constraint on prefix sums (NP-hard in general), so `infmoe_order` searches
depth-first (exhaustive up to 8 streamed experts), then, degrading gracefully, accepts orders
where only the computation never waits (the link may pause for a slot: harmless); beyond 8
experts (the runner computes the order while the layer waits: it must take milliseconds) the
search is skipped (a budget of nodes per expert cost ~50 ms for 32 experts) for one greedy
descent (the search's first path, taking at each step the first expert that adds no wait,
else the least harmful one; < 1 ms), beside heaviest-first; up to 10 experts, both improved by
pairwise swaps. It is never
worse than the public release's in-order double buffering (`inorder`) on `simulate`'s
makespan: that order is a candidate too.

Why the lower bound max(sum c, sum b) is out of reach when one expert is heavy: while an
expert of compute C runs, the link can fill only the K-1 other slots and then idles, and the
last expert loaded still computes after its load, so the makespan is at least
max(b + sum c, sum b + max(0, C - (K-1) b) + min c) (`k_lower_bound`; checked against every
order by brute force in the tests).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Optional, Sequence

EPS = 1e-12
EXACT = 8  # streamed experts up to which the search is exhaustive
IMPROVE = 10  # ... up to which the fallback orders are improved by pairwise swaps (O(T^3))


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Per position of `order`: load start/end (equal for resident experts) and compute start/end."""

    order: tuple
    load_start: tuple
    load_end: tuple
    compute_start: tuple
    compute_end: tuple

    @property
    def makespan(self) -> float:
        return self.compute_end[-1] if self.compute_end else 0.0

    @property
    def compute_wait(self) -> float:
        """Time the compute stream spent waiting for weights after the first expert started."""
        return sum(max(0.0, s - e) for s, e in zip(self.compute_start[1:], self.compute_end[:-1]))


def _load_times(load, experts) -> dict:
    if isinstance(load, (int, float)):
        return {e: float(load) for e in experts}
    return {e: float(load[e]) for e in experts}


@dataclasses.dataclass
class _State:
    """The simulation after a prefix of the order (incremental, for the search)."""

    link_free: float
    compute_free: float
    releases: list  # heap of times at which a slot becomes free
    stalled: bool = False  # the link waited for a slot
    waited: bool = False  # the compute stream waited for weights (after the first expert)
    started: bool = False

    def copy(self) -> "_State":
        return dataclasses.replace(self, releases=list(self.releases))


def _start(slots: int, resident_count: int) -> _State:
    return _State(0.0, 0.0, [0.0] * max(0, slots - resident_count))


def _advance(state: _State, c: float, b: float, resident: bool):
    """One expert more: returns (load start, load end, compute start, compute end) or None when
    no slot can ever free up (every slot holds an expert that comes later: deadlock)."""
    if resident:
        load_start = load_end = 0.0
    else:
        if not state.releases:
            return None
        slot = heapq.heappop(state.releases)
        load_start = max(state.link_free, slot)
        if slot > state.link_free + EPS:
            state.stalled = True
        load_end = load_start + b
        state.link_free = load_end
    start = max(state.compute_free, load_end)
    if state.started and load_end > state.compute_free + EPS:
        state.waited = True
    end = start + c
    state.compute_free, state.started = end, True
    heapq.heappush(state.releases, end)
    return load_start, load_end, start, end


def simulate(order: Sequence[int], compute, load, slots: int, resident=()) -> Timeline:
    """The timeline of `order` (expert ids) with compute times compute[e], load time `load` (one
    b, or load[e]), `slots` device slots and `resident` experts already on the device.
    A deadlocked order gets an infinite makespan."""
    resident = set(resident)
    loads = _load_times(load, order)
    state = _start(slots, sum(e in resident for e in order))
    cols = [[], [], [], []]
    for e in order:
        step = _advance(state, float(compute[e]), loads[e], e in resident)
        if step is None:
            inf = float("inf")
            step = (inf, inf, inf, inf)
            state.compute_free = inf
        for col, v in zip(cols, step):
            col.append(v)
    return Timeline(tuple(order), *map(tuple, cols))


def lower_bound(compute, load, experts: Sequence[int], resident=()) -> float:
    """max(sum of compute, sum of loads) over `experts`: no order can beat it (the figure the
    benchmarks divide by)."""
    loads = _load_times(load, experts)
    return max(sum(float(compute[e]) for e in experts),
               sum(loads[e] for e in experts if e not in set(resident)))


def k_lower_bound(compute: Sequence[float], load: float, slots: int) -> float:
    """The makespan no order of experts with compute times `compute`, one load time b each and
    K `slots` can beat: the first computation waits for a load (b + sum c); the link moves
    every expert (sum b), idles while the heaviest computes beyond K-1 loads (it cannot free a
    slot), and the last expert loaded computes after its load (+ min c)."""
    compute = [float(x) for x in compute]
    if not compute:
        return 0.0
    b = float(load)
    return max(b + sum(compute), len(compute) * b + max(0.0, max(compute) - (slots - 1) * b) + min(compute))


def facts_constraints(order: Sequence[int], compute, b: float, slots: int) -> bool:
    """(A) and (B) of the module docstring, as prefix sums (one load time b, nothing resident)."""
    prefix = list(itertools.accumulate(float(compute[e]) for e in order))
    total = len(order)
    for t in range(2, total + 1):
        p = prefix[t - 2]
        if p < (t - 1) * b - EPS:
            return False
        if t <= total - slots + 1 and p > (t + slots - 3) * b + EPS:
            return False
    return True


def inorder(experts: Sequence[int]) -> list[int]:
    """The public release: experts in index order (double buffered by the runner)."""
    return sorted(experts)


def infmoe_order(compute, load, slots: int, experts: Optional[Sequence[int]] = None, resident=(),
                 budget: Optional[int] = None) -> list[int]:
    """The InfMoE order of `experts` (default: those with compute > 0). See the module docstring.

    Resident experts go first (they need no load and their computation hides the first load);
    the search then orders the rest. `budget`: search nodes per tier (default: exhaustive up to
    8 streamed experts, 400 beyond, ~10 ms for 32 experts).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if experts is None:
        experts = [e for e in range(len(compute)) if compute[e] > 0]
    experts = list(experts)
    resident = [e for e in experts if e in set(resident)]
    streamed = [e for e in experts if e not in set(resident)]
    resident.sort(key=lambda e: -float(compute[e]))
    if len(streamed) <= 1:
        return resident + streamed
    loads = _load_times(load, streamed)
    if budget is None:
        budget = 10 ** 6 if len(streamed) <= EXACT else 0
    head = _start(slots, len(resident))
    for e in resident:
        _advance(head, float(compute[e]), 0.0, True)
    best = None
    for strict in (True, False):
        found = _search(head, streamed, compute, loads, strict, budget) if budget else None
        if found is not None:
            best = resident + found
            break
    if best is not None:  # optimal: only the first load shows (ties with in-order keep it)
        candidates = [best]
    else:
        candidates = [resident + _descend(head, streamed, compute, loads),
                      resident + sorted(streamed, key=lambda e: -float(compute[e]))]
        if len(streamed) <= IMPROVE:
            candidates = [_improve(o, compute, load, slots, resident, len(resident)) for o in candidates]
    candidates.append(resident + inorder(streamed))
    spans = [simulate(o, compute, load, slots, resident).makespan for o in candidates]
    least = min(spans)
    return next(o for o, span in zip(candidates, spans) if span <= least + 1e-9 * max(1.0, least))


def _search(head: _State, experts, compute, loads, strict: bool, budget: int):
    """Depth-first search for an order where the compute stream never waits (and, if `strict`,
    the link never waits for a slot); children tried from the largest computation down when
    the computation has little lead over the loads, from the smallest up otherwise."""
    nodes = [0]

    def rec(state: _State, rest: list, prefix: list):
        if not rest:
            return prefix
        nodes[0] += 1
        if nodes[0] > budget:
            return None
        seen = set()
        for e in _children(state, rest, compute, loads):
            key = (float(compute[e]), loads[e])
            if key in seen:  # equal experts are interchangeable
                continue
            seen.add(key)
            nxt = state.copy()
            if _advance(nxt, float(compute[e]), loads[e], False) is None:
                continue
            if not prefix:  # the first load cannot hide behind anything streamed: every order has it
                nxt.waited = False
            if nxt.waited or (strict and nxt.stalled):
                continue
            rest2 = list(rest)
            rest2.remove(e)
            got = rec(nxt, rest2, prefix + [e])
            if got is not None:
                return got
            if nodes[0] > budget:
                return None
        return None

    return rec(head.copy(), list(experts), [])


def _children(state: _State, rest, compute, loads) -> list:
    """The search's child order: the largest computation first when the computation has little
    lead over the loads (it must build one), the smallest first otherwise (it spares slots)."""
    lead = state.compute_free - state.link_free
    mean_b = sum(loads[e] for e in rest) / len(rest)
    children = sorted(set(rest), key=lambda e: -float(compute[e]))
    if lead > mean_b:
        children.reverse()
    return children


def _descend(head: _State, experts, compute, loads) -> list:
    """One greedy pass down the search tree: at each step the first child (in `_children`'s
    order) that adds no wait to either stream, else the least harmful one (a compute wait is
    worse than a link stall). O(T^2) advances."""
    state, rest, order = head.copy(), list(experts), []
    while rest:
        best = None
        for e in _children(state, rest, compute, loads):
            nxt = state.copy()
            if _advance(nxt, float(compute[e]), loads[e], False) is None:
                continue
            if not order:
                nxt.waited = False
            rank = (nxt.waited, nxt.stalled)  # flags stay set once a stream has waited
            if best is None or rank < best[0]:
                best = (rank, e, nxt)
            if rank == (state.waited, state.stalled):  # no new harm
                break
        if best is None:  # every slot held by a later expert: keep the rest in order
            return order + sorted(rest)
        _, e, state = best
        order.append(e)
        rest.remove(e)
    return order


def _improve(order, compute, load, slots, resident, fixed: int, rounds: int = 2) -> list:
    """Pairwise swaps (after the first `fixed` positions) that shorten the simulated makespan."""
    order = list(order)
    best = simulate(order, compute, load, slots, resident).makespan
    for _ in range(rounds):
        better = False
        for i in range(fixed, len(order)):
            for j in range(i + 1, len(order)):
                order[i], order[j] = order[j], order[i]
                span = simulate(order, compute, load, slots, resident).makespan
                if span < best - EPS:
                    best, better = span, True
                else:
                    order[i], order[j] = order[j], order[i]
        if not better:
            break
    return order
