"""Greedy decoding throughput, this project vs `transformers` `generate`, same weights.

The `small` config (mT5-small's shape, CPM-2's 52,736-id vocabulary) with random weights is
built in transformers, converted with `cpm2_jax.convert.hf_mt5`, and decoded greedily at
batch 1 and batch 16 by both. Both generate exactly NEW_TOKENS tokens (EOS is forbidden until
then: `min_new_tokens = max_new_tokens`), transformers with `use_cache=True`. Times are the
median of REPEATS runs after one warm-up (which includes our compilation, reported apart).
Prints one JSON object last and writes it to benchmarks/results/decode.json.

    python benchmarks/decode.py [--new_tokens 64] [--input_length 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)

RESULTS = RESULTS_DIR / "decode.json"


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, median of `repeats` further calls, last result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--input_length", type=int, default=32)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import transformers

    from cpm2_jax import decoding
    from cpm2_jax.config import get_config
    from cpm2_jax.convert.hf_mt5 import config_to_hf, params_from_hf_state_dict

    config = get_config(args.size)
    torch.manual_seed(0)
    hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**config_to_hf(config, dtype="float32")))
    hf.eval()
    params = jax.device_put(params_from_hf_state_dict(hf.state_dict(), config))
    n = args.new_tokens
    report = {"benchmark": "greedy decode tokens/s", "size": args.size, "new_tokens": n,
              "input_length": args.input_length, "repeats": args.repeats}
    rng = np.random.RandomState(0)
    for batch in (int(b) for b in args.batches.split(",")):
        enc = rng.randint(2, config.vocab_size, size=(batch, args.input_length)).astype(np.int32)
        enc[:, -1] = 1
        if batch > 1:  # padded rows, as real batches have
            enc[1::2, args.input_length // 2:] = 0

        def ours():
            out = decoding.greedy(params, enc, config=config, max_new_tokens=n, min_new_tokens=n)
            return np.asarray(jax.block_until_ready(out.tokens))

        ids = torch.tensor(enc, dtype=torch.long)
        mask = (ids != 0).long()

        def theirs():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=n, min_new_tokens=n, use_cache=True)
            return out[:, 1:].numpy()

        first, ours_s, ours_tokens = _timed(ours, args.repeats)
        _, theirs_s, theirs_tokens = _timed(theirs, args.repeats)
        tokens = batch * n
        report[f"ours_tokens_per_s_b{batch}"] = round(tokens / ours_s, 1)
        report[f"torch_tokens_per_s_b{batch}"] = round(tokens / theirs_s, 1)
        report[f"speedup_vs_torch_b{batch}"] = round(theirs_s / ours_s, 2)
        report[f"ours_compile_and_first_run_s_b{batch}"] = round(first, 2)
        report[f"tokens_match_b{batch}"] = bool(ours_tokens.shape == theirs_tokens.shape
                                                and np.array_equal(ours_tokens, theirs_tokens))
        print(f"batch {batch}: ours {tokens / ours_s:.1f} tok/s, transformers {tokens / theirs_s:.1f} tok/s, "
              f"speedup {theirs_s / ours_s:.2f}x", file=sys.stderr)
    report["machine"] = machine_info()
    write_report(report, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
