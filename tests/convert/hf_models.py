"""A random transformers MT5 model for the conversion tests (torch on the CPU).

Weights are random and well spread so a wrong mapping cannot hide: every norm scale,
embedding row and relative-position bias is N(0, 0.5); every matrix is N(0, 1/fan_in), which
keeps attention neither uniform nor one-hot. (N(0, 0.5) on the matrices too makes the model so
ill-conditioned that float32 transformers itself is 1e-2 away from its own float64 result.)
"""
from __future__ import annotations

import numpy as np

from cpm2_jax.config import ModelConfig, get_config
from cpm2_jax.convert import config_to_hf

# 4 heads x 8 = 32 != d_model 64 and 2 encoder vs 3 decoder layers, so no two sizes coincide.
TEST_CONFIG = get_config("tiny", head_dim=8, num_decoder_layers=3)


def _spread(model) -> None:
    """Matrices N(0, 1/fan_in); norm scales, embeddings and relative-position biases N(0, 0.5)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "shared.weight" and "relative_attention_bias" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.5)


def random_mt5(config: ModelConfig = TEST_CONFIG, seed: int = 0):
    """An eval-mode MT5ForConditionalGeneration with an untied output head and random weights."""
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(seed)
    model = MT5ForConditionalGeneration(MT5Config(**config_to_hf(config)))
    # transformers 5.x forces MT5Config.tie_word_embeddings=True; CPM-2's head is untied.
    model.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
    model.config.tie_word_embeddings = False
    _spread(model)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    return model.eval()


def random_tied_mt5(config: ModelConfig = TEST_CONFIG, seed: int = 0, model_type: str = "mt5"):
    """An eval-mode MT5 (or T5) ForConditionalGeneration as transformers 5 builds it by default:
    tied (`lm_head` is `shared`; `save_pretrained` writes no lm_head.weight), random weights."""
    import torch
    import transformers

    from cpm2_jax.convert import config_to_hf

    torch.manual_seed(seed)
    hf_config = {**config_to_hf(config), "tie_word_embeddings": True, "model_type": model_type}
    config_cls, model_cls = ((transformers.MT5Config, transformers.MT5ForConditionalGeneration) if model_type == "mt5"
                             else (transformers.T5Config, transformers.T5ForConditionalGeneration))
    model = model_cls(config_cls(**hf_config))
    _spread(model)
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    return model.eval()


def hf_logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """transformers' logits for encoder tokens `enc` (0 = padding) and decoder inputs `dec`."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0).long(),
                    decoder_input_ids=torch.tensor(dec))
    return out.logits.numpy()


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# Switch: 4 encoder layers with MoE every 2nd (layers 1, 3), 3 decoder layers all MoE, 4 experts.
SWITCH_CONFIG = get_config("tiny", vocab_size=256, d_model=32, d_ff=48, head_dim=8, num_encoder_layers=4,
                           num_decoder_layers=3, num_experts=4, moe_router="top_k", moe_top_k=1,
                           ffn_activation="relu", moe_expert_norm=False, moe_expert_capacity=64,
                           moe_router_bias=True, moe_encoder_sparse_step=2, moe_decoder_sparse_step=1,
                           tie_word_embeddings=True, dropout_rate=0.0, moe_jitter=0.01)


def random_switch(config: ModelConfig = SWITCH_CONFIG, seed: int = 0):
    """An eval-mode SwitchTransformersForConditionalGeneration with random, well spread weights
    (the router's N(0, 1/fan_in) * 4 so tokens spread over all experts)."""
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from cpm2_jax.convert import hf_switch

    torch.manual_seed(seed)
    hf_config = hf_switch.config_to_hf(config)
    # transformers 5.x ties the input embeddings only when tie_word_embeddings is set: build tied,
    # then untie the head alone (as random_mt5 does).
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**{**hf_config,
                                                                                 "tie_word_embeddings": True}))
    if not config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0.0, 4 * (p.shape[1] ** -0.5 if p.ndim == 2 else 1.0))
            elif p.ndim == 2 and name != "shared.weight" and "relative_attention_bias" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.5)
    tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert tied == config.tie_word_embeddings
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    return model.eval()
