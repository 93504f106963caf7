"""MoE models train with the same binary and gin run files as dense ones (issue 5, item 3)."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_moe_tiny_trains_with_the_train_binary(tmp_path):
    """The BASE (balanced) router, CPM-2's; that top-k routing's auxiliary losses reach the
    objective of the same train step is checked in-process by tests/test_trainer.py
    (test_moe_diagnostics_reach_the_train_and_eval_metrics)."""
    router = "balanced"
    model_dir = tmp_path / "run"
    args = [sys.executable, "-m", "cpm2_jax.train", "--gin_file=models/cpm2_moe_tiny.gin",
            "--gin_file=runs/pretrain.gin", "--gin_file=tests/gin/byte_pairs.gin",
            f"--gin.cpm2_jax.model_config.moe_router='{router}'",
            "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=8", "--gin.CHECKPOINT_PERIOD=30", "--gin.EVAL_PERIOD=0",
            "--gin.EVAL_STEPS=2", "--gin.WARMUP_STEPS=10", "--gin.LEARNING_RATE=3e-3",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.cpm2_jax.train.train.log_period=1", "--no_progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 30 and (model_dir / "checkpoints" / "30").is_dir()
    assert summary["train"]["aux_loss"] == 0  # BASE balanced routing has no auxiliary loss
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    assert len(losses) >= 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_train_step_routes_in_training_mode_without_dropout(monkeypatch):
    """With dropout_rate 0 the train step still runs the model in training mode, so the BASE
    router balances (argmax is its inference fallback); the eval step uses the fallback."""
    import jax.numpy as jnp

    from cpm2_jax.config import get_config
    from cpm2_jax.moe import routing
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    seen = []
    original = routing.route_balanced

    def recording(affinity, *, balanced=True, **kw):
        seen.append(balanced)
        return original(affinity, balanced=balanced, **kw)

    monkeypatch.setattr(routing, "route_balanced", recording)
    config = get_config("cpm2_moe_tiny", dropout_rate=0.0, moe_router="balanced")
    trainer = Trainer(config, TrainerConfig(), make_mesh({"data": 1}), total_steps=2)
    state = trainer.init_state()
    batch = {"encoder_input_tokens": jnp.ones((2, 8), jnp.int32), "decoder_input_tokens": jnp.ones((2, 8), jnp.int32),
             "decoder_target_tokens": jnp.ones((2, 8), jnp.int32)}
    seen.clear()
    state, _ = trainer.train_step(state, batch)  # the old state is donated
    assert seen and all(seen)
    seen.clear()
    trainer.eval_step(state.params, batch)
    assert seen and not any(seen)
