"""Peak memory of one training step: full fine-tuning vs prompt tuning (CPM2_FACTS "Prompt
tuning": 46-76% of full fine-tuning's GPU memory in the paper).

Both steps are this project's Trainer step (forward + backward + AdamW update) on the same
config (`base`), batch (8 x 512 inputs / 128 targets), compute dtype and remat policy:
- full fine-tuning: float32 parameters, float32 gradients and AdamW moments for all of them;
- prompt tuning: a 100-vector encoder prompt (float32, with its AdamW state), the frozen
  backbone stored in bfloat16 (`param_dtype`), gradients for the prompt alone.
Memory is XLA's compiled memory analysis of the step: arguments + temporaries + outputs
(minus what donation aliases, reported too). Each variant compiles in its own process; with
`--execute` it also runs one step there on random weights and reports the process's peak RSS
as a check (slow on CPU: minutes per step for `base`). The figure independent of the
baseline: the analytic bytes of the parameter state (params + grads + optimiser) as a
fraction of each measured peak (the rest is activations and workspace).

What the backward pass keeps (the same model code for both variants): a frozen weight keeps
no input for its gradient (autodiff prunes it; the CPU VJPs of `cpu_weight_grads` skip it
when JAX reports the weight unperturbed) and, under `--scan_layers`, is its layer's own slice
of the stacked parameter (not a stacked copy: Projection contracts kernels in their own shape);
RMSNorm keeps x alone, the GELU gate a and b alone; attention keeps q, k, v and its float32
log-normaliser, recomputing the softmax weights in the backward pass (`--attention_recompute
on`, ModelConfig.attention_recompute; 'off' keeps the [batch, heads, q, k] float32 weights of
every layer: 1.6 of the prompt step's 5.2 GiB more, ratio 0.51 instead of 0.42).
XLA:CPU's buffer report still shows float32 stacks for many bfloat16 residuals and float32
copies of the bf16 backbone's stacked weights (it runs bf16 dynamic-slices and dots in
float32): ~0.9 GiB of the prompt step; a GPU/TPU peak should be lower.

    python benchmarks/prompt_memory.py [--config base] [--batch 8] [--enc_len 512] [--dec_len 128]
        [--dtype bfloat16] [--remat none full] [--attention_recompute on|off] [--scan_layers] [--execute]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)

RESULTS = RESULTS_DIR / "prompt_memory.json"
PROMPT_LENGTH = 100


def measure(args) -> dict:
    """One variant in this process: compile (and optionally run) the step, return its memory."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpm2_jax.config import get_config
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.prompts import PromptConfig
    from cpm2_jax.trainer import Trainer, TrainerConfig

    config = get_config(args.config, dtype=args.dtype, remat_policy=args.remat, cpu_weight_grads=args.cpu_weight_grads,
                        scan_layers=args.scan_layers, attention_recompute=args.attention_recompute == "on")
    optimizer = OptimizerConfig(learning_rate=5e-3 if args.variant == "prompt" else 1e-4, schedule="constant",
                                weight_decay=0.0 if args.variant == "prompt" else 0.01)
    if args.variant == "prompt":
        config = config.replace(param_dtype="bfloat16", prompt=PromptConfig(length=PROMPT_LENGTH, init="normal"))
        trainer_cfg = TrainerConfig(optimizer=optimizer, trainable=["prompt"])
    else:
        trainer_cfg = TrainerConfig(optimizer=optimizer)
    trainer = Trainer(config, trainer_cfg, make_mesh({"data": 1}), total_steps=1)
    batch_shapes = {"encoder_input_tokens": (args.batch, args.enc_len),
                    "decoder_input_tokens": (args.batch, args.dec_len), "decoder_target_tokens": (args.batch, args.dec_len)}
    abstract_batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=trainer.batch_sharding)
                      for k, s in batch_shapes.items()}
    compiled = trainer.lower_train_step(trainer.abstract_state(), abstract_batch).compile()
    mem = compiled.memory_analysis()
    args_b, temp_b, out_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    state = trainer._state_shapes
    nbytes = lambda tree: int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize  # noqa: E731
                                  for x in jax.tree_util.tree_leaves(tree)))
    trainable = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(state.params),
                                                         jax.tree_util.tree_leaves(trainer.mask)) if m)
    state_bytes = nbytes(state.params) + nbytes(state.opt_state) + 4 * trainable  # + float32 gradients
    out = {"variant": args.variant, "remat": args.remat, "dtype": args.dtype,
           "arguments_bytes": int(args_b), "temporaries_bytes": int(temp_b), "outputs_bytes": int(out_b),
           "aliased_bytes": int(alias_b), "peak_bytes": int(args_b + temp_b + out_b),
           "peak_bytes_with_donation": int(args_b + temp_b + out_b - alias_b),
           "param_bytes": nbytes(state.params), "optimizer_state_bytes": nbytes(state.opt_state),
           "trainable_parameters": trainable, "parameter_state_bytes": state_bytes}
    out["parameter_state_fraction_of_peak"] = round(state_bytes / out["peak_bytes"], 4)
    out["rss_after_compile_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.execute:
        rng = np.random.default_rng(0)
        batch = {k: rng.integers(2, config.vocab_size, size=s).astype(np.int32) for k, s in batch_shapes.items()}
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
        jax.block_until_ready(metrics["loss"])
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_variant(args, variant: str, remat: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--remat_child", remat, "--config", args.config,
           "--batch", str(args.batch), "--enc_len", str(args.enc_len), "--dec_len", str(args.dec_len),
           "--dtype", args.dtype, "--cpu_weight_grads", args.cpu_weight_grads,
           "--attention_recompute", args.attention_recompute]
    cmd += (["--execute"] if args.execute else []) + (["--scan_layers"] if args.scan_layers else [])
    print(f"[prompt_memory] {variant} fine-tuning={variant == 'full'} remat={remat} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"variant {variant}/{remat} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--enc_len", type=int, default=512)
    parser.add_argument("--dec_len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of both variants")
    parser.add_argument("--remat", nargs="+", default=["none", "full"],
                        help="remat policies (the first is the default)")
    parser.add_argument("--cpu_weight_grads", default="off", choices=["auto", "on", "off"],
                        help="ModelConfig.cpu_weight_grads of both variants; 'off' (what 'auto' is on GPU/TPU): "
                             "the CPU-only hand-written weight-gradient VJPs keep every matmul input as a "
                             "residual, even for frozen weights")
    parser.add_argument("--attention_recompute", default="on", choices=["on", "off"],
                        help="ModelConfig.attention_recompute of both variants: 'on' keeps attention's log-normaliser "
                             "and recomputes its softmax weights in the backward pass (flash attention's trade); "
                             "'off' keeps the [batch, heads, q, k] float32 weights of every layer")
    parser.add_argument("--scan_layers", action="store_true",
                        help="nn.scan over layers in both variants (as the 11B configs): compiles ~10x faster")
    parser.add_argument("--execute", action="store_true", help="also run one step per variant: peak RSS check")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON report goes")
    parser.add_argument("--child", choices=["full", "prompt"], help=argparse.SUPPRESS)
    parser.add_argument("--remat_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant, args.remat = args.child, args.remat_child
        print(json.dumps(measure(args)))
        return
    rows = {}
    for remat in args.remat:
        full, prompt = run_variant(args, "full", remat), run_variant(args, "prompt", remat)
        rows[remat] = {"full_finetuning": full, "prompt_tuning": prompt,
                       "memory_ratio": round(prompt["peak_bytes"] / full["peak_bytes"], 4),
                       "memory_ratio_with_donation": round(prompt["peak_bytes_with_donation"]
                                                           / full["peak_bytes_with_donation"], 4)}
        if args.execute:
            rows[remat]["rss_ratio"] = round(prompt["peak_rss_bytes"] / full["peak_rss_bytes"], 4)
        print(f"[prompt_memory] remat={remat}: full {full['peak_bytes'] / 2**30:.2f} GiB, prompt "
              f"{prompt['peak_bytes'] / 2**30:.2f} GiB, ratio {rows[remat]['memory_ratio']}", file=sys.stderr)
    default = args.remat[0]
    report = {"benchmark": "prompt_memory", "config": args.config, "batch": args.batch, "enc_len": args.enc_len,
              "dec_len": args.dec_len, "compute_dtype": args.dtype, "prompt_length": PROMPT_LENGTH,
              "cpu_weight_grads": args.cpu_weight_grads, "scan_layers": args.scan_layers,
              "attention_recompute": args.attention_recompute,
              "memory_ratio": rows[default]["memory_ratio"], "memory_ratio_target": 0.45,
              "memory_ratio_met": rows[default]["memory_ratio"] <= 0.45, "default_remat": default,
              "by_remat": rows, "paper": "prompt tuning at 46-76% of full fine-tuning's GPU memory",
              "machine": machine_info()}
    write_report(report, args.results)


if __name__ == "__main__":
    main()
