"""Greedy decoding throughput, this project vs `transformers` `generate`, same weights, and how
close batch-1 decoding comes to the memory roofline of this machine.

The `small` config (mT5-small's shape, CPM-2's 52,736-id vocabulary, untied output matrix) with
random weights is built in transformers, converted with `cpm2_jax.convert.hf_mt5`, and decoded
greedily at batch 1 and batch 16 by both. Both generate exactly NEW_TOKENS tokens (EOS is
forbidden until then: `min_new_tokens = max_new_tokens`), transformers with `use_cache=True`;
the tokens must be identical. Ours decodes with the batch-1 weight layouts built once for the
model (`decoding.prepare_decode_weights`, as `cpm2 infer` and `cpm2 eval` do; the time to build
them is reported apart, `prepare_decode_weights_s`), as transformers decodes with the weights
it loaded. Each side is run once (our first call compiles, reported apart),
then the two are timed in turn for `--repeats` rounds (benchmarks/timing.py: both see the same
background load) and the medians taken.

Roofline (batch 1): one greedy step must read the decoder's weights (self-attention, the
cross-attention query and output matrices, FFN, norms, relative-position table), the encoder
keys/values cached for cross-attention, the self-attention keys/values of the positions so far
(averaged over the steps), one embedding row and the output matrix. At the best read bandwidth
of a jitted float32 matrix-vector product with the output matrix's shape (the largest matrix,
both layouts, best call; timed in the same rounds as the decoders), those bytes take

    roofline_time = step_bytes / bandwidth,   roofline_fraction_b1 = roofline_time / step_time,

with step_time = median time of one whole `greedy` call (encoder included) / NEW_TOKENS. The
fraction depends on neither PyTorch nor the machine's load (both times are measured in the
same rounds). Beside it, what bounds it: the best read bandwidth of the same batch-1 products
over the decoder's own 0.8-4 MB step matrices (`decoder_matvec_bandwidth_gb_per_s`, a jitted
chain of them, timed in the same rounds) and the step time the weights alone would take at the
two rates (`matvec_bound_step_s`). Prints one JSON object last and writes it to
benchmarks/results/decode.json.

    python benchmarks/decode.py [--new_tokens 64] [--input_length 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)
from timing import start_cpu_frameworks, timed_interleaved, untied_mt5  # noqa: E402  (benchmarks/timing.py)

RESULTS = RESULTS_DIR / "decode.json"
CROSS_KV = ("key", "value")  # cross-attention projections whose outputs are cached once per call


def greedy_step_bytes(params, config, *, batch: int, input_length: int, new_tokens: int) -> dict:
    """Bytes one greedy decoder step must read, by part (see the module docstring)."""
    import jax
    import numpy as np

    decoder = params["decoder"]
    weights = cross_skipped = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(decoder)[0]:
        names = [getattr(k, "key", None) for k in path]
        size = np.size(leaf) * np.dtype(leaf.dtype).itemsize
        if "encoder_decoder_attention" in names and any(n in CROSS_KV for n in names):
            cross_skipped += size
        elif "logits_dense" not in names:
            weights += size
    embedding = params["token_embedder"]["embedding"]
    itemsize = np.dtype(embedding.dtype).itemsize
    head = decoder["logits_dense"]["kernel"] if "logits_dense" in decoder else embedding
    head_bytes = np.size(head) * np.dtype(head.dtype).itemsize
    act = np.dtype(config.dtype).itemsize
    inner = config.num_heads * config.head_dim
    layers = config.num_decoder_layers
    cross_cache = 2 * layers * batch * input_length * inner * act
    mean_positions = (new_tokens + 1) / 2  # step t reads the keys/values of positions 0..t
    self_cache = 2 * layers * batch * mean_positions * inner * act
    parts = {"decoder_weights": int(weights), "output_matrix": int(head_bytes),
             "cross_attention_cache": int(cross_cache), "self_attention_cache": int(self_cache),
             "embedding_rows": int(batch * config.d_model * itemsize)}
    return {"total": int(sum(parts.values())), **parts,
            "not_read_cross_kv_weights": int(cross_skipped)}


def matvec_probe(head, calls: int):
    """A function that times `calls` jitted x @ W (and W^T x on the transposed copy) and records
    the best call: the read bandwidth reference of the roofline."""
    import jax
    import jax.numpy as jnp

    d_in, d_out = head.shape
    layouts = {"[in, out]": (jax.jit(lambda x, w: x @ w), jnp.ones((1, d_in), head.dtype), head),
               "[out, in]": (jax.jit(lambda x, w: w @ x), jnp.ones((d_in,), head.dtype), jnp.asarray(head.T))}
    best = {name: float("inf") for name in layouts}
    for fn, x, w in layouts.values():
        fn(x, w).block_until_ready()

    def probe():
        for name, (fn, x, w) in layouts.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn(x, w).block_until_ready()
                best[name] = min(best[name], time.perf_counter() - start)

    return probe, best


def decoder_matvec_probe(params, stacked, passes: int = 8):
    """A function that times one jitted loop of `passes` passes over the decoder's step matrices
    (per layer: the stacked q/k/v [d, 3 * inner], self-attention out, cross-attention query and
    out, the stacked wi_0/wi_1 [d, 2 * ff], wo^T [d, ff] read as W x; as `decoding.decode_weights`
    feeds a step), one batch-1 matrix-vector product each, chained (each input is the previous
    output cut or zero-padded to the next matrix's input size), and records the best call's read bandwidth:
    the rate XLA:CPU's matrix-vector products reach on these 0.8-4 MB matrices, beside the
    output matrix's. `stacked`: `decoding.prepare_decode_weights(params)`, the layouts the timed
    decoding reads. Returns (probe, best seconds per pass, bytes per pass)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    stacked = stacked["decoder"]
    decoder = params["decoder"]
    flat = lambda w, n_in=1: w.reshape(int(np.prod(w.shape[:n_in])), -1)  # noqa: E731
    mats = []  # (matrix, read as W x: [out, in])
    for name in sorted((k for k in decoder if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])):
        layer, extra = decoder[name], stacked[name]
        cross = layer["encoder_decoder_attention"]
        mats += [(flat(extra["self_attention"]["qkv"]), False),
                 (flat(layer["self_attention"]["out"]["kernel"], 2), False),
                 (flat(cross["query"]["kernel"]), False), (flat(cross["out"]["kernel"], 2), False)]
        # the dense gated FFN (the benchmark's model)
        mats += [(flat(extra["mlp"]["wi"]), False), (extra["mlp"]["wo_t"], True)]
    out_in = [t for _, t in mats]
    mats = [jnp.asarray(m) for m, _ in mats]
    width = max(max(m.shape) for m in mats)

    @jax.jit
    def chain(mats, x):
        def one_pass(_, x):
            for m, transposed in zip(mats, out_in):
                y = jnp.einsum("bi,oi->bo", x[:, :m.shape[1]], m) if transposed else x[:, :m.shape[0]] @ m
                x = jnp.tanh(jnp.pad(y, ((0, 0), (0, width - y.shape[1]))))
            return x
        return jax.lax.fori_loop(0, passes, one_pass, x)

    x0 = jnp.full((1, width), 0.01, mats[0].dtype)
    chain(mats, x0).block_until_ready()
    best = [float("inf")]

    def probe():
        start = time.perf_counter()
        chain(mats, x0).block_until_ready()
        best[0] = min(best[0], (time.perf_counter() - start) / passes)

    return probe, best, int(sum(np.size(m) * m.dtype.itemsize for m in mats))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--input_length", type=int, default=32)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matvec_calls", type=int, default=5, help="matrix-vector calls per layout and round")
    parser.add_argument("--threads", type=int, default=0, help="cores for both frameworks (0 = all available)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    threads = start_cpu_frameworks(args.threads)
    import jax
    import numpy as np
    import torch

    from cpm2_jax import decoding
    from cpm2_jax.config import get_config
    from cpm2_jax.convert.hf_mt5 import params_from_hf_state_dict

    config = get_config(args.size)
    hf = untied_mt5(config)
    hf.eval()
    params = jax.device_put(params_from_hf_state_dict(hf.state_dict(), config))
    jax.block_until_ready(decoding.prepare_decode_weights(params, config=config))  # compiled
    start = time.perf_counter()
    weights = jax.block_until_ready(decoding.prepare_decode_weights(params, config=config))
    prepare_s = time.perf_counter() - start
    n = args.new_tokens
    report = {"benchmark": "greedy decode tokens/s", "size": args.size, "new_tokens": n,
              "input_length": args.input_length, "repeats": args.repeats,
              "parameters": {"jax": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
                             "torch": int(sum(p.numel() for p in hf.parameters()))},
              "threads": {"count": threads, "torch": torch.get_num_threads()},
              "prepare_decode_weights_s": round(prepare_s, 4)}
    rng = np.random.RandomState(0)
    for batch in (int(b) for b in args.batches.split(",")):
        enc = rng.randint(2, config.vocab_size, size=(batch, args.input_length)).astype(np.int32)
        enc[:, -1] = 1
        if batch > 1:  # padded rows, as real batches have
            enc[1::2, args.input_length // 2:] = 0
        results = {}

        def ours():
            out = decoding.greedy(params, enc, config=config, max_new_tokens=n, min_new_tokens=n, weights=weights)
            results["ours"] = np.asarray(jax.block_until_ready(out.tokens))

        ids = torch.tensor(enc, dtype=torch.long)
        mask = (ids != 0).long()

        def theirs():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=n, min_new_tokens=n, use_cache=True)
            results["theirs"] = out[:, 1:].numpy()

        fns = {"jax": ours, "torch": theirs}
        if batch == 1:
            head = params["decoder"]["logits_dense"]["kernel"]
            fns["matvec"], best_matvec = matvec_probe(head, args.matvec_calls)
            fns["decoder_matvecs"], best_decoder, decoder_bytes = decoder_matvec_probe(params, weights)
        first, times = timed_interleaved(fns, warmup=1, reps=args.repeats)
        ours_s, theirs_s = statistics.median(times["jax"]), statistics.median(times["torch"])
        tokens = batch * n
        report[f"ours_tokens_per_s_b{batch}"] = round(tokens / ours_s, 1)
        report[f"torch_tokens_per_s_b{batch}"] = round(tokens / theirs_s, 1)
        report[f"speedup_vs_torch_b{batch}"] = round(theirs_s / ours_s, 2)
        report[f"ours_compile_and_first_run_s_b{batch}"] = round(first["jax"], 2)
        report[f"ours_times_s_b{batch}"] = [round(t, 4) for t in times["jax"]]
        report[f"torch_times_s_b{batch}"] = [round(t, 4) for t in times["torch"]]
        report[f"tokens_match_b{batch}"] = bool(results["ours"].shape == results["theirs"].shape
                                                and np.array_equal(results["ours"], results["theirs"]))
        print(f"batch {batch}: ours {tokens / ours_s:.1f} tok/s, transformers {tokens / theirs_s:.1f} tok/s, "
              f"speedup {theirs_s / ours_s:.2f}x", file=sys.stderr)
        if batch == 1:
            step_bytes = greedy_step_bytes(params, config, batch=1, input_length=args.input_length, new_tokens=n)
            layout = min(best_matvec, key=best_matvec.get)
            bandwidth = np.size(head) * head.dtype.itemsize / best_matvec[layout]
            roofline_s = step_bytes["total"] / bandwidth
            report["roofline_b1"] = {
                "step_bytes": step_bytes,
                "matvec_shape": list(head.shape),
                "matvec_best_s": {k: round(v, 6) for k, v in best_matvec.items()},
                "matvec_best_layout": layout,
                "bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
                "roofline_step_s": round(roofline_s, 6),
                "measured_step_s": round(ours_s / n, 6),
                "measured_best_step_s": round(min(times["jax"]) / n, 6),
            }
            # What bounds the figure: the decoder matrices' products read slower than the output
            # matrix's. A step at those two rates (weights only, nothing else) would take:
            decoder_bw = decoder_bytes / best_decoder[0]
            matvec_bound_s = step_bytes["output_matrix"] / bandwidth + decoder_bytes / decoder_bw
            report["roofline_b1"].update({
                "decoder_matvec_bytes": decoder_bytes,
                "decoder_matvec_best_pass_s": round(best_decoder[0], 6),
                "decoder_matvec_bandwidth_gb_per_s": round(decoder_bw / 1e9, 2),
                "matvec_bound_step_s": round(matvec_bound_s, 6),
                "matvec_bound_fraction_of_roofline": round(roofline_s / matvec_bound_s, 3),
            })
            report["roofline_fraction_b1"] = round(roofline_s / (ours_s / n), 3)
            report["roofline_fraction_b1_best_run"] = round(roofline_s / (min(times["jax"]) / n), 3)
            print(f"batch 1 roofline: {step_bytes['total'] / 1e6:.1f} MB/step at {bandwidth / 1e9:.2f} GB/s = "
                  f"{roofline_s * 1e3:.2f} ms; measured {ours_s / n * 1e3:.2f} ms/step: fraction "
                  f"{report['roofline_fraction_b1']}", file=sys.stderr)
            print(f"batch 1 decoder matrices: {decoder_bytes / 1e6:.1f} MB at {decoder_bw / 1e9:.2f} GB/s; weights "
                  f"alone at the two matvec rates take {matvec_bound_s * 1e3:.2f} ms/step", file=sys.stderr)
    report["targets"] = {"roofline_fraction_b1": 0.6}
    report["machine"] = machine_info()
    report["unix_time"] = int(time.time())
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
