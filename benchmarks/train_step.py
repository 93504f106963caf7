"""Training-step throughput: this project (jitted JAX train step) vs transformers MT5 (PyTorch).

One step = forward + backward + AdamW update (weight decay 0.01, global-norm clipping 1.0),
float32, on the same config, weights, batch and sequence lengths. Tokens/s counts encoder
+ decoder tokens per step. Each side is warmed up, then both are timed in turn for
`--reps` rounds (same background load) and the medians taken. The process is pinned to
`--threads` cores; torch gets as many intra-op threads, XLA's CPU pool sees the same cores.

Also: the achieved FLOP/s of the JAX step (FLOPs from XLA's cost analysis of the compiled
step / median step time) as a fraction of the measured peak of a large float32 XLA matmul
(2 n^3 FLOPs) on the same cores. Prints one JSON object last and writes it to
benchmarks/results/train_step.json.

    python benchmarks/train_step.py [--config small] [--batch 16] [--enc_len 128] [--dec_len 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from report import RESULTS_DIR, machine_info, side_by_side, write_report  # noqa: E402  (benchmarks/report.py)
from timing import start_cpu_frameworks, timed_interleaved, untied_mt5  # noqa: E402  (benchmarks/timing.py)

RESULTS = RESULTS_DIR / "train_step.json"


def matmul_peak(n: int, reps: int) -> dict:
    """FLOP/s of an n x n x n float32 matmul compiled by XLA (the reference peak)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"n": n, "flops": 2 * n ** 3, "best_s": round(best, 5), "flop_per_s": 2 * n ** 3 / best}


def _xla_flops(lowered) -> float:
    analysis = lowered.compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def bench(args) -> dict:
    import jax
    import numpy as np
    import torch

    from cpm2_jax.config import get_config
    from cpm2_jax.convert import params_from_hf_state_dict
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    config = get_config(args.config)
    hf_model = untied_mt5(config)
    hf_model.train()

    # The same recipe on both sides: AdamW(lr 1e-3, b 0.9/0.999, eps 1e-8, wd 0.01), clip 1.0,
    # plain cross-entropy (no z-loss, no label smoothing), constant learning rate.
    opt = OptimizerConfig(name="adamw", learning_rate=1e-3, schedule="constant", weight_decay=0.01, clip_norm=1.0)
    trainer = Trainer(config, TrainerConfig(optimizer=opt, z_loss=0.0), make_mesh({"data": 1}), total_steps=1000)
    params = params_from_hf_state_dict(hf_model.state_dict(), config)
    torch_parameters = int(sum(p.numel() for p in hf_model.parameters()))
    jax_parameters = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    if torch_parameters != jax_parameters:  # like for like: both train the same parameters
        raise SystemExit(f"parameter counts differ: torch {torch_parameters}, jax {jax_parameters}")
    state = trainer.state_from_params(jax.device_put(params, trainer.param_shardings))

    rng = np.random.default_rng(0)
    enc = rng.integers(2, config.vocab_size, (args.batch, args.enc_len)).astype(np.int32)
    tgt = rng.integers(2, config.vocab_size, (args.batch, args.dec_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((args.batch, 1), np.int32), tgt[:, :-1]], axis=1)
    local = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
             "decoder_loss_weights": np.ones_like(tgt, np.float32)}
    batch = trainer.shard_batch(local)
    tokens = args.batch * (args.enc_len + args.dec_len)
    step_flops = _xla_flops(trainer.lower_train_step(state, batch))

    holder = {"state": state, "losses": []}

    def run_jax():
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        holder["losses"].append(float(metrics["loss"]))  # blocks until the step is done

    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    enc_t, dec_t, tgt_t = (torch.tensor(x, dtype=torch.long) for x in (enc, dec_in, tgt))
    mask_t = torch.ones_like(enc_t)
    torch_losses = []

    def run_torch():
        optimizer.zero_grad(set_to_none=True)
        out = hf_model(input_ids=enc_t, attention_mask=mask_t, decoder_input_ids=dec_t, labels=tgt_t)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        torch_losses.append(float(out.loss.detach()))

    first, times = timed_interleaved({"jax": run_jax, "torch": run_torch}, args.warmup, args.reps)
    jax_s = statistics.median(times["jax"])
    peak = matmul_peak(args.matmul_n, args.reps)
    achieved = step_flops / jax_s
    best = step_flops / min(times["jax"])
    return {
        "config": args.config,
        "parameters": {"jax": jax_parameters, "torch": torch_parameters},
        "batch": args.batch, "encoder_length": args.enc_len, "decoder_length": args.dec_len,
        "tokens_per_step": tokens,
        **side_by_side(tokens, "tokens", first, times),
        # Same weights and batch: the first step's loss must agree (a check that both train the same model).
        "first_loss": {"jax": holder["losses"][0], "torch": torch_losses[0]},
        "jax_step_flops": step_flops,
        "jax_flop_per_s": round(achieved, 1),
        "matmul_peak": peak,
        "fraction_of_matmul_peak": round(achieved / peak["flop_per_s"], 4),
        # The fastest step (least disturbed by other jobs on a shared machine).
        "fraction_of_matmul_peak_best_step": round(best / peak["flop_per_s"], 4),
        "speedup_vs_torch_best_steps": round(min(times["torch"]) / min(times["jax"]), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--enc_len", type=int, default=128)
    parser.add_argument("--dec_len", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="cores for both frameworks (0 = all available)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    threads = start_cpu_frameworks(args.threads)
    import torch

    # XLA's CPU code flushes denormals to zero; torch does not by default, and Adam's second
    # moments of small gradients are denormal often enough to slow torch several-fold.
    torch.set_flush_denormal(True)
    result = bench(args)
    report = {
        "benchmark": "train_step",
        "step": "forward + backward + AdamW (wd 0.01, clip 1.0), float32",
        "tokens": "encoder + decoder tokens per step",
        "threads": {"count": threads, "torch": torch.get_num_threads(),
                    "jax": "XLA CPU pool, process pinned to the same cores"},
        "torch_flush_denormal": True,
        **result,
        "targets": {"speedup_vs_torch": 1.0, "fraction_of_matmul_peak": 0.5},  # issue 9: like for like, both untied
        "machine": machine_info(),
        "unix_time": int(time.time()),
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
