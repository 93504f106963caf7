"""Forward-pass throughput: this project (jitted JAX) vs transformers MT5 (PyTorch), same weights.

For each config a random MT5ForConditionalGeneration is built, converted with
`cpm2_jax.convert`, and both run the same batch (float32, no padding). Tokens/s counts
encoder + decoder tokens per forward pass; each side is warmed up, then the two are timed
in turn for `--reps` rounds (so both see the same background load) and the medians taken.
torch runs under `torch.inference_mode()` with `torch.set_num_threads(--threads)`; the
process is pinned to that many cores so XLA's CPU thread pool gets the same number. Prints one JSON object as the last line and writes it to
benchmarks/results/forward.json.

    python benchmarks/forward.py [--configs tiny,small] [--batch 4] [--enc_len 256] [--dec_len 64]
"""
from __future__ import annotations

import argparse
import sys
import time

from report import RESULTS_DIR, machine_info, side_by_side, write_report  # noqa: E402  (benchmarks/report.py)
from timing import start_cpu_frameworks, timed_interleaved, untied_mt5  # noqa: E402  (benchmarks/timing.py)

RESULTS = RESULTS_DIR / "forward.json"


def bench_config(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from cpm2_jax.config import get_config
    from cpm2_jax.convert import params_from_hf_state_dict
    from cpm2_jax.model.transformer import EncoderDecoder

    config = get_config(name)
    hf_model = untied_mt5(config)
    hf_model.eval()
    params = jax.device_put(params_from_hf_state_dict(hf_model.state_dict(), config))

    rng = np.random.default_rng(0)
    enc = rng.integers(2, config.vocab_size, (args.batch, args.enc_len)).astype(np.int32)
    dec = rng.integers(2, config.vocab_size, (args.batch, args.dec_len)).astype(np.int32)
    tokens = args.batch * (args.enc_len + args.dec_len)

    model = EncoderDecoder(config)
    forward = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    enc_j, dec_j = jnp.asarray(enc), jnp.asarray(dec)
    jax_out = {}

    def run_jax():
        jax_out["logits"] = forward(params, enc_j, dec_j).block_until_ready()

    enc_t, dec_t = torch.tensor(enc, dtype=torch.long), torch.tensor(dec, dtype=torch.long)
    mask_t = torch.ones_like(enc_t)
    torch_out = {}

    def run_torch():
        with torch.inference_mode():
            torch_out["logits"] = hf_model(input_ids=enc_t, attention_mask=mask_t, decoder_input_ids=dec_t).logits

    first, times = timed_interleaved({"jax": run_jax, "torch": run_torch}, args.warmup, args.reps)
    diff = float(np.abs(np.asarray(jax_out["logits"]) - torch_out["logits"].numpy()).max())
    return {
        "config": name,
        "parameters": int(sum(p.numel() for p in hf_model.parameters())),
        "batch": args.batch, "encoder_length": args.enc_len, "decoder_length": args.dec_len,
        "tokens_per_forward": tokens,
        **side_by_side(tokens, "tokens", first, times),
        "max_abs_logit_diff": diff,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated named sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--enc_len", type=int, default=256)
    parser.add_argument("--dec_len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="cores for both frameworks (0 = all available)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    threads = start_cpu_frameworks(args.threads)
    import torch

    results = [bench_config(name.strip(), args) for name in args.configs.split(",") if name.strip()]
    report = {
        "benchmark": "forward",
        "dtype": "float32",
        "tokens": "encoder + decoder tokens per forward pass",
        "threads": {"count": threads, "torch": torch.get_num_threads(),
                    "jax": "XLA CPU pool, process pinned to the same cores"},
        "results": results,
        "speedup_vs_torch": {r["config"]: r["speedup_vs_torch"] for r in results},
        "machine": machine_info(),
        "unix_time": int(time.time()),
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
