"""Model configuration: one frozen dataclass and the named sizes of CPM-2 and its test models.

Figures from CPM2_FACTS.md ("Dense model"): 24+24 layers, d_model 4096, d_ff 10240,
64 heads x 64, 32 relative-position buckets (max distance 128), bilingual vocabulary 52,736.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from cpm2_jax.errors import ConfigError, check_choice, closest
from cpm2_jax.prompts.config import as_prompt_config  # registers PromptConfig with gin


# Feed-forward activations and the weight names of their blocks (dense and per expert).
FFN_WEIGHTS = {"gated_gelu": ("wi_0", "wi_1", "wo"), "relu": ("wi", "wo")}
FFN_ACTIVATIONS = tuple(FFN_WEIGHTS)
CPU_WEIGHT_GRADS = ("auto", "on", "off")  # ModelConfig.cpu_weight_grads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every dimension and switch of the dense (and, with `num_experts`, MoE) model."""

    vocab_size: int = 52736
    d_model: int = 4096
    d_ff: int = 10240
    num_heads: int = 64
    head_dim: int = 64
    num_encoder_layers: int = 24
    num_decoder_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0  # 0 in pre-training, 0.1 in fine-tuning (CPM2_FACTS "Dense model")
    init_std: float = 0.001  # the original code's normal(0, 0.001) for every matrix
    # Numerics: parameters are stored in `param_dtype`; matmuls run in `dtype`. Softmax and
    # RMSNorm statistics are always float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Compilation: nn.scan over layers (fast compile for 48 layers) and a remat policy name
    # from cpm2_jax.model.transformer.REMAT_POLICIES ("none", "full", "dots", ...).
    scan_layers: bool = False
    remat_policy: str = "none"
    # Hand-written weight-gradient VJPs of the projections and the gated-GELU FFN
    # (model/dense.py `weight_grad`): they exist for XLA:CPU, which otherwise copies the large
    # [tokens, out] gradient into a transposed layout before every weight-gradient matmul.
    # "auto" = on when JAX's default backend is CPU, plain autodiff on GPU/TPU (so fusion and
    # the remat policies see every matmul); "on" / "off" force either. Same gradients.
    cpu_weight_grads: str = "auto"
    # Attention's backward pass recomputes the softmax weights from q, k and the bias, keeping
    # only their float32 log-normaliser [batch, heads, q] instead of the [batch, heads, q, k]
    # float32 weights (flash attention's trade: one more q k^T per layer for the largest
    # activation of long inputs). Same gradients up to float rounding; off keeps the weights.
    attention_recompute: bool = False
    # Architecture switches for other T5-family checkpoints (defaults are CPM-2's): the FFN
    # "gated_gelu" (wi_0, wi_1, wo) or "relu" (wi, wo, Switch / T5 v1.0); a tied output head,
    # logits = (x * d_model**-0.5) . embedding^T, instead of the untied `logits_dense`.
    ffn_activation: str = "gated_gelu"
    tie_word_embeddings: bool = False
    # Mixture of experts (0 = dense). Filled in by the MoE configs.
    num_experts: int = 0
    moe_router: str = "balanced"
    # auto | xla (alias ragged_dot) | padded | einsum | pallas (cpm2_jax.kernels); moe.grouped_matmul.
    # `auto` = ragged_dot on GPU, padded on CPU (and under expert parallelism): it does not take
    # pallas until a device run of benchmarks/kernels_gpu.py / kernels_tpu.py has shown the
    # kernels compile and win (none has yet); pallas is used only when asked for by name.
    moe_backend: str = "auto"
    # With moe_backend="pallas": the token permutation (sort-by-expert gather, weighted combine)
    # as Pallas kernels (moe.dispatch; False: jnp.take and a weighted sum), and the fused
    # gated-GELU expert block (kernels.ffn: one kernel for gelu(x W0) * (x W1), then the third
    # gmm; a, b and h recomputed in the backward instead of stored). The fused block is off by
    # default until a device run (benchmarks/kernels_gpu.py) measures it faster than unfused.
    moe_permute_kernels: bool = True
    moe_fused_ffn: bool = False
    moe_capacity_factor: float = 1.0
    moe_top_k: int = 1
    # (MoE issue) tokens per routing group, 0 = one group per sequence; weights of the sown aux
    # losses (top_k: load balancing; top_k/experts_choose: router z-loss); Switch's multiplicative
    # router jitter; the balanced router's inference fallback to plain argmax (CPM2_FACTS).
    moe_group_size: int = 0
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 1e-3
    moe_jitter: float = 0.0
    moe_eval_argmax: bool = True
    # (Switch interop) layer i of a stack is MoE when step == 1 or i % step == 1 (transformers'
    # SwitchTransformers rule; 0 = no MoE layer in that stack); per-expert RMSNorm scales (CPM-2)
    # or one shared pre-norm before router and experts (Switch); a router bias; a fixed number
    # of slots per expert and routing group (> 0 overrides moe_capacity_factor).
    moe_encoder_sparse_step: int = 1
    moe_decoder_sparse_step: int = 1
    moe_expert_norm: bool = True
    moe_router_bias: bool = False
    moe_expert_capacity: int = 0
    # BASE: refill the routing groups with tokens from all groups before balanced assignment,
    # in training (moe.shuffle; needs >1 group and a dropout rng, which the trainer passes).
    moe_shuffle_tokens: bool = True
    # Prompt tuning (cpm2_jax.prompts.PromptConfig, or its fields): a prompt table inserted into
    # the encoder input; None = no prompt.
    prompt: Optional[Any] = None

    def __post_init__(self):
        object.__setattr__(self, "prompt", as_prompt_config(self.prompt))
        for field in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim",
                      "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        check_choice("ModelConfig.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("ModelConfig.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        check_choice("ModelConfig.cpu_weight_grads", self.cpu_weight_grads, CPU_WEIGHT_GRADS)
        check_choice("ModelConfig.ffn_activation", self.ffn_activation, FFN_ACTIVATIONS)
        if self.num_experts < 0:
            raise ConfigError(f"ModelConfig.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.is_moe:
            if self.moe_capacity_factor <= 0:
                raise ConfigError(f"ModelConfig.moe_capacity_factor must be > 0, got {self.moe_capacity_factor}")
            if not 1 <= self.moe_top_k <= self.num_experts:
                raise ConfigError(f"ModelConfig.moe_top_k must be between 1 and num_experts ({self.num_experts}), "
                                  f"got {self.moe_top_k}")
            if self.moe_group_size < 0 or not 0 <= self.moe_jitter < 1:
                raise ConfigError("ModelConfig.moe_group_size must be >= 0 and moe_jitter in [0, 1)")
            if min(self.moe_encoder_sparse_step, self.moe_decoder_sparse_step, self.moe_expert_capacity) < 0:
                raise ConfigError("ModelConfig.moe_{encoder,decoder}_sparse_step and moe_expert_capacity must be >= 0")
            if self.scan_layers and (self.moe_encoder_sparse_step > 1 or self.moe_decoder_sparse_step > 1):
                raise ConfigError("scan_layers=True needs identical layers: MoE in every layer or none "
                                  "(moe_encoder_sparse_step / moe_decoder_sparse_step 0 or 1)")

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"ModelConfig has no field {name!r}"
                              + closest(name, [f.name for f in dataclasses.fields(self)]))
        return dataclasses.replace(self, **changes)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, stack: str, index: int) -> bool:
        """Whether layer `index` of `stack` ("encoder" | "decoder") holds an MoE block."""
        step = self.moe_encoder_sparse_step if stack == "encoder" else self.moe_decoder_sparse_step
        return self.is_moe and step > 0 and (step == 1 or index % step == 1)


# The named sizes. `small` and `base` have mT5-small's / mT5-base's shapes with the bilingual
# CPM-2 vocabulary; `tiny` is for tests (its vocabulary is small so tests stay fast).
SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, d_model=64, d_ff=128, num_heads=4, head_dim=16,
                        num_encoder_layers=2, num_decoder_layers=2),
    "small": ModelConfig(d_model=512, d_ff=1024, num_heads=6, head_dim=64,
                         num_encoder_layers=8, num_decoder_layers=8),
    "base": ModelConfig(d_model=768, d_ff=2048, num_heads=12, head_dim=64,
                        num_encoder_layers=12, num_decoder_layers=12),
    "cpm2_11b": ModelConfig(),
    # The Chinese stage: 26,240 ids (26,050 word-pieces + 190 sentinels), same body.
    "cpm2_11b_zh": ModelConfig(vocab_size=26240),
}


# Modules that register further sizes with `register_size`, imported on first look-up.
_SIZE_MODULES = ("cpm2_jax.moe.configs",)


def get_config(name: str, **overrides) -> ModelConfig:
    """The named size, with field overrides; an unknown name suggests the closest one."""
    if name not in SIZES:
        import importlib

        for module in _SIZE_MODULES:
            importlib.import_module(module)
    if name not in SIZES:
        raise ConfigError(f"unknown model size {name!r}{closest(name, SIZES)}; "
                          f"known sizes: {', '.join(sorted(SIZES))}")
    return SIZES[name].replace(**overrides) if overrides else SIZES[name]


def register_size(name: str, config: ModelConfig, *, overwrite: bool = False) -> None:
    """Adds a named size (the MoE configs register theirs here)."""
    if name in SIZES and not overwrite and SIZES[name] != config:
        raise ConfigError(f"model size {name!r} is already registered with a different config")
    SIZES[name] = config


def dtype_of(name: Optional[str]):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
