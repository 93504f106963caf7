"""InfMoE offloading on the CPU with the paced link model (cpm2_jax.offload).

On a machine of >= 2 cores the paced link's thread gets a core of its own and XLA's compute
the others (`split_cores`: a DMA engine apart from the compute units); the dispatching thread,
which mostly waits, joins the link's core once XLA's pool has started (`--dispatch_core link`):
on the compute core its every wake-up took the core from the experts (0.66-0.79 against
0.886-0.900 on one machine). Every arm and the all-resident reference alike.

1. One MoE layer, 32 experts, Zipf-skewed routing (the Zipf ranks shuffled over the expert
   ids: in-order is not handed a heaviest-first order), K slots, link bandwidth set so one
   expert's load takes as long as an average expert's computation: the InfMoE order and
   in-order double buffering, each as efficiency = lower bound / measured, lower bound =
   max(sum of expert computations measured with every expert resident, sum of loads at the
   link's set rate), paired (each repetition's resident run with its runs of the arms, in a
   fresh order) and the median taken over --layer_reps repetitions; the link's achieved rate
   beside its set rate; for each K in --k_sweep
   too, with the K-aware bound (schedule.k_lower_bound: an expert of compute C holds the link
   to K-1 loads: under this skew K=4 is capped near 0.95, K=8 near 0.98).
   Experts of d_model 256 x d_ff 2048 (6.3 MB in float32): the layer-stepped decoder of 2 below
   spends a fixed ~2.5 ms a token on the CPU in Python and XLA dispatch whatever the experts'
   size, and at d_ff 1024 one load (~2.1 ms at the matched link) was no larger than that, so the
   decoding ratio measured the dispatch more than the experts' traffic (every expert resident
   was only 2.5-4.0x the in-order stream). On a GPU with CPM-2-MoE's experts a load is
   milliseconds against a step's microseconds of dispatch; d_ff 2048 is a step towards that
   regime, not into it (ceiling 3.4-4.9x here). `--d_ff 1024` gives the earlier sizes.
2. Greedy decoding (batch 1, --new_tokens 64: decoding rather than the encoder's loads and a
   cold cache; --prompts 4 inputs, each from a cold cache, a repetition's time their sum: one
   input's routing had set the figure, its hit rate 0.53 where another's was 0.74) of a small
   MoE model with Zipf-skewed routers, K = --decode_slots 16 (a quarter
   of the decoder's 2 x 32 experts), after a warm-up on another input (compiles; gives the
   routing history the lfu cache and the next step's prefetch learn from; within a step the
   prefetch applies the next layer's router to this layer's input), over the same link as 1
   (`decode.link` gives one load's time against the calibrated one-token expert call, in a
   stream of calls as decoding issues them: 3.4-9.7x over one session's runs here at d_ff
   2048, where on a GPU a one-token expert is microseconds against milliseconds of PCIe
   load): tokens/s of in-order streaming with no cache against lfu cache + prefetch, each in
   float32 and int8, with and without host compute (numpy on the host's core - the link's,
   beside the device's - for a cold expert whose tokens cost less there than its load and
   dequantisation; `decode.link` gives that ratio: 0.1-0.6 over one session's runs here,
   ~0.25 on a GPU server, host-memory against PCIe bandwidth; here the host computes a
   one-token expert about as fast as the device, both reading it from one RAM, so the host's
   experts are rarely also loaded for the cache: `CostModel.fill_pays`), and each precision's
   ceiling (the same runner with every expert resident at that precision, no
   link), medians of --reps runs interleaved across the arms in a fresh order each time.
   decode_speedup is the full design (lfu cache + prefetch + int8 + host compute) against
   float32 in-order streaming (the public release); like-with-like speedups and ceilings
   beside it, the int8 lfu cache without prefetch (prefetch_gain_int8: what the prefetch adds
   to the cache) and without host compute (host_gain_int8).
3. int8 transfer against float32: greedy-token agreement teacher-forced along the float32
   path (8 prompts), with the float32 top-2 logit margin, the int8 logit change, their
   relative error and the agreement on the steps that are not near ties (see int8_agreement).

    python benchmarks/offload.py            # CPU, ~minutes; --quick for a smoke run
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

if __name__ == "__main__":  # before numpy loads its BLAS: the host-compute arms' host is one core (the
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # link's, `split_cores`), not the compute core too

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import RESULTS_DIR, machine_info, write_report  # noqa: E402
from cpm2_jax.config import get_config  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from cpm2_jax.offload import schedule as S  # noqa: E402
from cpm2_jax.offload.options import CostModel, OffloadOptions, Stats  # noqa: E402
from cpm2_jax.offload.runner import OffloadRunner  # noqa: E402
from cpm2_jax.offload.split_moe import route  # noqa: E402


def zipf_probs(n: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def build(args, layers: int, seed: int = 0):
    """An MoE model whose routers prefer experts by a Zipf law: centroid e scaled by a
    log-probability-like margin, so argmax routing of random hidden states is skewed."""
    c = get_config("cpm2_moe_tiny", vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff,
                   num_heads=4, head_dim=args.d_model // 4, num_experts=args.experts,
                   num_encoder_layers=layers, num_decoder_layers=layers, init_std=0.05)
    tok = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(EncoderDecoder(c).init(jax.random.PRNGKey(seed), tok, tok)["params"])
    ranks = np.random.default_rng(seed + 100).permutation(args.experts)  # expert id -> Zipf rank
    zipf = zipf_probs(args.experts)[ranks]
    boost = jnp.asarray(1.0 + 3.0 * zipf / zipf.max(), jnp.float32)

    def skew(path, a):
        names = [getattr(k, "key", "") for k in path]
        return a * boost if "centroids" in names else a

    return c, jax.tree_util.tree_map_with_path(skew, params), zipf


def zipf_hidden(c, params, zipf, tokens: int, rng) -> jax.Array:
    """[1, tokens, d] hidden states routed by a Zipf law: token t is centroid e_t plus noise."""
    centroids = np.asarray(params["encoder"]["layers_0"]["moe"]["router"]["centroids"])  # [d, E]
    experts = rng.choice(c.num_experts, size=tokens, p=zipf)
    h = centroids[:, experts].T * 50.0 + rng.normal(0, 0.01, size=(tokens, c.d_model))
    return jnp.asarray(h[None], jnp.float32)


def shuffled(arms, rep: int) -> list:
    """The arms in a fresh order each repetition (seeded): an arm run right after a streaming one
    ran 10-15% slower (measured: the same arm, before and after in-order streaming), so a fixed
    order handed that cost to whichever arm came next."""
    names = list(arms)
    np.random.default_rng(rep).shuffle(names)
    return names


def run_layers(c, params, h, arms: dict, cost, reps: int, resident) -> tuple[dict, list]:
    """Each arm's times over `reps` runs of the layer (and their medians), the runs interleaved
    across the arms and the `resident` runner (every expert on the device: its times, one a
    repetition, are the compute-only term)."""
    runners, got, compute_times = {}, {}, []
    try:
        for name, opts in arms.items():
            runners[name] = OffloadRunner(c, params, opts, cost=cost, store=resident.store)
            runners[name].moe_ffn("encoder", 0, h)  # warm-up (every tile is compiled already)
            got[name] = {"times": [], "waits": [], "link": []}
        for rep_ in range(reps):
            for name in shuffled([*runners, "resident"], rep_):
                if name == "resident":
                    t = time.perf_counter()
                    resident.moe_ffn("encoder", 0, h)
                    compute_times.append(time.perf_counter() - t)
                    continue
                r = runners[name]
                r.reset_stats()
                t = time.perf_counter()
                r.moe_ffn("encoder", 0, h)
                got[name]["times"].append(time.perf_counter() - t)
                got[name]["waits"].append(r.stats.wait_time)
                got[name]["link"].append(r.stats.link_bandwidth)
                assert r.slots.peak <= r.options.device_experts, (r.slots.peak, r.options.device_experts)
                got[name]["timeline"], got[name]["loads"] = r.stats.timeline, r.stats.loads
    finally:
        for r in runners.values():
            r.close()
    return {name: {"s": statistics.median(g["times"]), "times": g["times"], "wait_s": statistics.median(g["waits"]),
                   "link_gb_s": statistics.median(g["link"]) / 1e9, "loads": g["loads"], "timeline": g["timeline"]}
            for name, g in got.items()}, compute_times


def layer_benchmark(args, rng, link_cores) -> dict:
    c, params, zipf = build(args, layers=1)
    h = zipf_hidden(c, params, zipf, args.tokens, rng)
    # Every expert resident: the computations alone (the lower bound's compute term).
    resident = OffloadRunner(c, params, OffloadOptions(device_experts=c.num_experts, cache="lru"),
                             cost=CostModel(1e-4, 1e-5, 1e-4), all_resident=True)
    try:
        resident.moe_ffn("encoder", 0, h)  # compiles every tile
        compute_times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            resident.moe_ffn("encoder", 0, h)
            compute_times.append(time.perf_counter() - t)
        counts = np.asarray(route(c, resident.model.moe_params("encoder", 0)["router"], h).counts)
        cost = resident.calibrate()  # compute estimates for the schedule (and the real link's load time)
        active = int(np.count_nonzero(counts))
        expert_bytes = resident.store.expert_bytes
        if args.real_link:
            bandwidth, load_s = None, cost.load
        else:  # one load ~ one average computation
            bandwidth = args.bandwidth or expert_bytes / (statistics.median(compute_times) / active)
            load_s = expert_bytes / bandwidth
        estimates = [cost.compute(int(n)) for n in counts if n]
        cost = CostModel(cost.overhead, cost.per_token, load_s)
        ks = sorted({args.slots, *args.k_sweep})
        arms = {(k, schedule): OffloadOptions(device_experts=k, schedule=schedule, cache="none", bandwidth=bandwidth,
                                              link_cores=link_cores)
                for k in ks for schedule in ("infmoe", "inorder")}
        got, more = run_layers(c, params, h, arms, cost, args.layer_reps, resident)
    finally:
        resident.close()
    compute_s = statistics.median(compute_times + more)  # the resident runs, before and between the arms'
    out = {"experts": c.num_experts, "active_experts": active, "tokens": args.tokens, "slots": args.slots,
           "expert_bytes": expert_bytes, "bandwidth_gb_s": round(expert_bytes / load_s / 1e9, 4),
           "zipf_counts": sorted(counts.tolist(), reverse=True), "compute_all_resident_s": round(compute_s, 5),
           "loads_s": round(active * load_s, 5)}
    scale = compute_s / sum(estimates)  # the calibrated line, scaled to the measured total
    bound = max(compute_s, active * load_s)
    sweep = {}
    for k in ks:
        row = {"k_bound_efficiency": round(bound / S.k_lower_bound([e * scale for e in estimates], load_s, k), 4)}
        for schedule in ("infmoe", "inorder"):
            g = got[(k, schedule)]
            row[f"{schedule}_s"] = round(g["s"], 5)
            row[f"{schedule}_wait_s"] = round(g["wait_s"], 5)
            # paired: each repetition's bound (its resident run) over its run of the arm, the
            # median of those - a slower or faster spell of the machine moves both alike
            row[f"{schedule}_efficiency"] = round(statistics.median(
                max(t_c, active * load_s) / t for t_c, t in zip(more, g["times"])), 4)
            row[f"{schedule}_link_achieved_gb_s"] = round(g["link_gb_s"], 4)
            if k == args.slots and schedule == "infmoe":
                out["timeline"] = g["timeline"]
        sweep[k] = row
    out.update({f"{key}": v for key, v in sweep[args.slots].items()})
    out["link_achieved_fraction"] = round(min(sweep[args.slots]["infmoe_link_achieved_gb_s"],
                                              sweep[args.slots]["inorder_link_achieved_gb_s"]) /
                                          out["bandwidth_gb_s"], 4)
    out["k_sweep"] = {str(k): row for k, row in sweep.items()}
    return out


def decode_benchmark(args, rng, bandwidth: float, link_cores) -> dict:
    c, params, _ = build(args, layers=args.layers, seed=1)
    warm = rng.integers(2, args.vocab, size=(1, 12)).astype(np.int32)
    # --prompts inputs (each decoded from a cold cache): one prompt's routing made the figure (its
    # hit rate was 0.53 where another's was 0.74 with the same model, slots and history)
    prompts = [rng.integers(2, args.vocab, size=(1, 12)).astype(np.int32) for _ in range(args.prompts)]
    base = dict(device_experts=args.decode_slots, bandwidth=bandwidth, link_cores=link_cores)
    # Like with like: each precision has its in-order stream, its cache + prefetch and its
    # all-resident ceiling (the same runner with every expert on the device, no link).
    arms = {"inorder_stream": OffloadOptions(schedule="inorder", cache="none", **base),
            "cache_prefetch": OffloadOptions(cache="lfu", prefetch=True, **base),
            "inorder_stream_int8": OffloadOptions(schedule="inorder", cache="none", int8=True, **base),
            "cache_prefetch_int8": OffloadOptions(cache="lfu", prefetch=True, int8=True, **base),
            # the cache alone (int8): what the prefetch adds to it
            "cache_int8": OffloadOptions(cache="lfu", int8=True, **base),
            # the full design: a cold expert whose tokens cost less on the host than its load runs
            # there (numpy on the host's core: the link's, beside the device's)
            "cache_prefetch_host": OffloadOptions(cache="lfu", prefetch=True, host_compute=True, **base),
            "cache_prefetch_int8_host": OffloadOptions(cache="lfu", prefetch=True, int8=True, host_compute=True,
                                                       **base)}
    ceilings = {"resident": OffloadOptions(device_experts=c.num_experts, cache="lru"),
                "resident_int8": OffloadOptions(device_experts=c.num_experts, cache="lru", int8=True)}
    n = args.new_tokens
    out, tokens, runners, history = {}, {}, {}, {}
    try:
        stores = {}  # one host copy of the experts per precision, shared by the runners
        for name, opts in {**ceilings, **arms}.items():
            r = runners[name] = OffloadRunner(c, params, opts, store=stores.get(opts.int8),
                                              all_resident=name in ceilings)
            stores[opts.int8] = r.store
            r.greedy(warm, max_new_tokens=n, min_new_tokens=n)  # compiles; the routing history
            r.greedy(prompts[0], max_new_tokens=n, min_new_tokens=n)  # compiles the shapes of the inputs
            r.frequency = {key: f * 0 for key, f in r.frequency.items()}
            r.greedy(warm, max_new_tokens=n, min_new_tokens=n)  # history from the warm-up input only
            history[name] = {key: f.copy() for key, f in r.frequency.items()}
        cost, host_cost = runners["inorder_stream"].cost, runners["cache_prefetch_int8_host"].cost
        # Repetitions interleaved across the runners (a load change hits all alike); each prompt
        # starts cold (empty slots, the warm-up's history); a repetition's time is its prompts' sum.
        times = {name: [] for name in runners}
        per_prompt = {name: [[] for _ in prompts] for name in runners}
        for rep_ in range(args.reps):
            for name in shuffled(runners, rep_):
                r = runners[name]
                total, stats, got = 0.0, Stats(), []
                for i, enc in enumerate(prompts):
                    r.frequency = {key: f.copy() for key, f in history[name].items()}
                    r.empty_slots()
                    r.reset_stats()
                    t = time.perf_counter()
                    res = r.greedy(enc, max_new_tokens=n, min_new_tokens=n)
                    dt = time.perf_counter() - t
                    total += dt
                    per_prompt[name][i].append(dt)
                    got.append(np.asarray(res.tokens)[0])
                    stats = stats.merged(r.stats)
                times[name].append(total)
                tokens[name] = np.stack(got)
                st = stats
                out[name] = {"loads": st.loads, "hit_rate": round(st.hit_rate, 3), "prefetches": st.prefetches,
                             "prefetch_hits": st.prefetch_hits, "guess_precision": round(st.guess_precision, 3),
                             "host_computes": st.host_computes, "fills": st.fills,
                             "running_precision": {k: round(v, 3) for k, v in r.precision.items()},
                             "bytes_moved": st.bytes_moved, "transfer_wait_s": round(st.wait_time, 4),
                             "link_achieved_gb_s": round(st.link_bandwidth / 1e9, 4)}
    finally:
        for r in runners.values():
            r.close()
    for name in times:
        dt = statistics.median(times[name])
        out[name].update({"tokens_per_s": round(n * len(prompts) / dt, 3), "tokens": n * len(prompts),
                          "seconds": round(dt, 4),
                          "tokens_per_s_by_prompt": [round(n / statistics.median(v), 1) for v in per_prompt[name]]})
    rate = {name: out[name]["tokens_per_s"] for name in times}
    for name in times:
        if name != "inorder_stream":
            out[f"speedup_{name}"] = round(rate[name] / rate["inorder_stream"], 3)
    # The figure: the full design (lfu cache + prefetch + int8 transfer + host compute)
    # against the public release's in-order streaming in float32. Beside it, like with like:
    # each technique at one precision, and each precision's ceiling (every expert resident at
    # that precision: what no cache can pass; int8's is the design's own ceiling).
    out["decode_speedup"] = out["speedup_cache_prefetch_int8_host"]
    out["speedup_cache_prefetch_f32"] = out["speedup_cache_prefetch"]
    out["host_gain_int8"] = round(rate["cache_prefetch_int8_host"] / rate["cache_prefetch_int8"], 3)  # > 1: it pays
    out["speedup_cache_prefetch_int8_vs_inorder_int8"] = round(rate["cache_prefetch_int8"] /
                                                               rate["inorder_stream_int8"], 3)
    out["prefetch_gain_int8"] = round(rate["cache_prefetch_int8"] / rate["cache_int8"], 3)  # > 1: prefetch pays
    out["decode_speedup_ceiling_f32"] = out.pop("speedup_resident")
    out["decode_speedup_ceiling_int8"] = out.pop("speedup_resident_int8")
    t_in, t_res, t_full = (out[k]["seconds"] for k in ("inorder_stream", "resident_int8", "cache_prefetch_int8_host"))
    out["transfer_time_removed"] = round((t_in - t_full) / (t_in - t_res), 3) if t_in > t_res else None
    # The link during decoding: the machine's (set by the one-layer benchmark); a step's one
    # token gives an expert far less work than its load, so streamed decoding is link-bound.
    out["link"] = {"bandwidth_gb_s": round(bandwidth / 1e9, 4) if bandwidth else None,
                   "expert_load_s": round(cost.load, 6), "expert_compute_1_token_s": round(cost.compute(1), 6),
                   "load_over_1_token_compute": round(cost.load / cost.compute(1), 2),
                   # host compute (int8, the full design's): a one-token expert on the host against
                   # moving it (load + dequantisation); on a GPU server about host-memory / PCIe
                   # bandwidth, ~0.25 (Fiddler)
                   "int8_expert_moving_s": round(host_cost.moving(), 6),
                   "int8_expert_host_1_token_s": round(host_cost.host(1), 6),
                   "host_1_token_over_moving_int8": round(host_cost.host(1) / host_cost.moving(), 3)}
    out["same_tokens_f32"] = bool(all((tokens[a] == tokens["inorder_stream"]).all()
                                      for a in ("resident", "cache_prefetch", "cache_prefetch_host")))
    out["same_tokens_int8"] = bool(all((tokens[a] == tokens["resident_int8"]).all()
                                       for a in ("inorder_stream_int8", "cache_prefetch_int8", "cache_int8",
                                                 "cache_prefetch_int8_host")))
    if getattr(args, "int8_check", True):
        out["int8"] = int8_agreement(c, params, rng, args)
    return out


def int8_agreement(c, params, rng, args, batch: int = 8) -> dict:
    """int8 transfer against float32 on `batch` prompts: the int8 model's argmax at every step
    of the float32 greedy path (teacher-forced: a flip does not derail the later steps), beside
    the float32 top-2 margin and the int8 logit change (a random model's logits are nearly tied:
    the margin is of the size of the change, so free-running agreement is not meaningful)."""
    from cpm2_jax import decoding
    from cpm2_jax.offload.stepped import SteppedModel

    n = args.new_tokens
    enc = rng.integers(2, args.vocab, size=(batch, 12)).astype(np.int32)
    ref_model = SteppedModel(c, params)  # every expert resident, float32 (the runner's outputs to 1e-6)
    ref = np.asarray(ref_model.greedy(enc, max_new_tokens=n, min_new_tokens=n).tokens)
    opts = OffloadOptions(device_experts=c.num_experts, cache="lru", int8=True)  # outputs: any K, cache
    with OffloadRunner(c, params, opts, cost=CostModel(1e-4, 1e-5, 1e-4)) as r:
        free = np.asarray(r.greedy(enc, max_new_tokens=n, min_new_tokens=n).tokens)
        s32 = ref_model.init_state(ref_model.encode(enc), enc, n)
        s8 = r.model.init_state(r.model.encode(enc), enc, n)
        current = np.full((batch,), decoding.DECODER_START_ID, np.int32)
        agree, margins, changes, rel = [], [], [], []
        for i in range(n):
            l32, s32 = ref_model.step(current, s32)
            l8, s8 = r.model.step(current, s8)
            l32, l8 = np.array(l32), np.array(l8)
            changes.append(np.abs(l8 - l32).max(-1))
            centred = l32 - l32.mean(-1, keepdims=True)
            rel.append(np.linalg.norm(l8 - l32, axis=-1) / np.linalg.norm(centred, axis=-1))
            l32[:, decoding.EOS_ID] = l8[:, decoding.EOS_ID] = -np.inf  # min_new_tokens = n
            assert (l32.argmax(-1) == ref[:, i]).all()  # the stepped float32 path is the greedy one
            agree.append(l8.argmax(-1) == ref[:, i])
            top2 = np.sort(l32, axis=-1)[:, -2:]
            margins.append(top2[:, 1] - top2[:, 0])
            current = ref[:, i]
    agree, margins, changes, rel = map(np.concatenate, (agree, margins, changes, rel))
    clear = margins > np.median(changes)  # not near-tied: the top-2 margin exceeds a typical int8 change
    return {"steps": int(agree.size), "teacher_forced_agreement": round(float(agree.mean()), 4),
            # the logits' error relative to their spread: int8 is accurate, the random model's
            # top-2 margins are tiny against that spread (512 near-Gaussian logits)
            "int8_logit_relative_error_median": round(float(np.median(rel)), 4),
            "steps_not_near_tied": int(clear.sum()),
            "agreement_not_near_tied": round(float(agree[clear].mean()), 4) if clear.any() else None,
            "free_running_agreement": round(float(np.mean(free == ref)), 4),
            "f32_top2_margin_median": round(float(np.median(margins)), 4),
            "int8_logit_change_median": round(float(np.median(changes)), 4),
            "int8_logit_change_max": round(float(changes.max()), 4),
            # a flip needs a change of at least half the margin: the share of steps that close
            "steps_margin_below_2x_change": round(float(np.mean(margins < 2 * changes)), 4)}


def plot(layer: dict, path) -> None:
    from cpm2_jax.offload.timeline import plot_timeline

    plot_timeline(layer.pop("timeline"), str(path), title=f"one MoE layer, InfMoE order, K={layer['slots']}")


def split_cores(real_link: bool) -> dict:
    """The paced link's thread on a core of its own, everything else (the XLA CPU pool, started
    after this, inherits it; the main thread until `--dispatch_core link` moves it) on the
    others - before jax starts.

    Why: the paced link is a CPU thread (a memcpy per expert, then a sleep to its deadline); on
    a 2-core machine it otherwise competes with XLA's two compute threads for the cores, and
    one expert's memcpy under that contention took about a whole load period (the link then
    delivered 14-54% of its set rate). A real link is a DMA engine apart from the compute
    units; one core for the link is its model here. The computation then runs on one core -
    in every arm alike, including the all-resident runs that give the lower bound's compute
    term - so the ratios compare like with like. The link sleeps rather than spins to its
    deadline: a spinning Python thread would hold the GIL the dispatching thread needs.
    Nothing is pinned with the real link, or with fewer than 2 cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if real_link or len(cores) < 2:
        return {"compute": cores or None, "link": None, "pinned": False}
    compute, link = cores[:-1], cores[-1:]
    os.sched_setaffinity(0, compute)  # this thread, and the threads started from now on
    return {"compute": compute, "link": tuple(link), "pinned": True}


def main(argv=None, name: str = "offload") -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--d_ff", type=int, default=2048,
                   help="expert hidden size: 2048 makes one expert's load (~4.3 ms) outweigh the layer-stepped "
                        "decoder's fixed per-token dispatch cost on a CPU (~2.5 ms); at 1024 (a ~2.1 ms load) the "
                        "decoding ratio measured mostly that dispatch cost (ceiling 2.5-4.0x)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=512, help="tokens through the one-layer benchmark")
    p.add_argument("--slots", type=int, default=8, help="K of the headline figures")
    p.add_argument("--decode_slots", type=int, default=16,
                   help="K of the decoding benchmark: a quarter of the decoder's experts (2 layers x 32), as "
                        "Mixtral-offloading's 2 of 8 per layer")
    p.add_argument("--k_sweep", type=int, nargs="*", default=[4], help="further K for the one-layer efficiencies")
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers of the decode model")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64,
                   help="decoded tokens (16 was mostly the encoder's loads and a cold cache, not decoding)")
    p.add_argument("--prompts", type=int, default=4,
                   help="decoded inputs per repetition, each from a cold cache (one input's routing set the figure)")
    p.add_argument("--layer_reps", type=int, default=45,
                   help="repetitions of the one-layer runs (~70 ms each: cheap; medians of paired ratios)")
    p.add_argument("--reps", type=int, default=9,
                   help="repetitions per decoding arm, --prompts inputs each (medians), and of the one-layer "
                        "benchmark's first all-resident runs")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s (default: matched to compute)")
    p.add_argument("--real_link", action="store_true", help="no link model: device_put over the real link")
    p.add_argument("--quick", action="store_true", help="smoke sizes")
    p.add_argument("--dispatch_core", choices=("compute", "link"), default="link",
                   help="where the dispatching (main) thread runs once XLA's pool has started on the compute cores: "
                        "beside the link thread (it mostly waits; XLA keeps its core) or on the compute cores")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.experts, args.tokens, args.reps, args.new_tokens = 64, 128, 8, 64, 2, 4
        args.layer_reps = 2
        args.slots, args.k_sweep, args.decode_slots, args.prompts = 4, [2], 4, 2
    sys.setswitchinterval(5e-4)  # the transfer and release threads get the GIL back promptly
    cores = split_cores(args.real_link)
    if cores["pinned"] and args.dispatch_core == "link":
        jnp.ones(8).block_until_ready()  # the CPU client and its thread pools exist: on the compute cores
        os.sched_setaffinity(0, cores["link"])  # this thread only (and threads it starts later)
    cores["dispatch"] = args.dispatch_core if cores["pinned"] else None
    rng = np.random.default_rng(0)
    print(f"[offload] one MoE layer: {args.experts} experts, {args.tokens} tokens, K={args.slots}", file=sys.stderr)
    layer = layer_benchmark(args, rng, cores["link"])
    suffix = "_quick" if args.quick else ""
    plot(layer, RESULTS_DIR / f"{name}_timeline{suffix}.png")
    print(f"[offload] {layer}", file=sys.stderr)
    bandwidth = None if args.real_link else layer["bandwidth_gb_s"] * 1e9
    decode = decode_benchmark(args, rng, bandwidth, cores["link"])
    report = {"benchmark": name, "machine": machine_info(), "args": vars(args), "cores": cores, "layer": layer,
              "decode": decode,
              "infmoe_efficiency": layer["infmoe_efficiency"], "inorder_efficiency": layer["inorder_efficiency"],
              "link_achieved_fraction": layer["link_achieved_fraction"], "decode_speedup": decode["decode_speedup"],
              "decode_speedup_ceiling_f32": decode["decode_speedup_ceiling_f32"],
              "decode_speedup_ceiling_int8": decode["decode_speedup_ceiling_int8"],
              "decode_prefetch_gain_int8": decode["prefetch_gain_int8"],
              "decode_host_gain_int8": decode["host_gain_int8"],
              "int8_teacher_forced_agreement": decode["int8"]["teacher_forced_agreement"],
              "int8_agreement_not_near_tied": decode["int8"]["agreement_not_near_tied"],
              "targets": {"infmoe_efficiency": 0.9, "decode_speedup": 2.5}}
    return write_report(report, RESULTS_DIR / f"{name}{suffix}.json")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
