"""Prompt tuning (CPM2_FACTS "Prompt tuning"): trainable vectors inserted into the input of a
frozen CPM-2.

- `config`: `PromptConfig` (length, tasks, placement per task, attention-mask variant,
  initialiser), set as `ModelConfig.prompt`;
- `placement`: where the vectors go in each row (front / middle at `<sep>` / back / split by
  ratios), the encoder mask variants, host-side checks of a batch;
- `module`: the prompt table [tasks, N, d_model] (a Flax module held by `EncoderDecoder`), and
  with `PromptConfig.decoder_length` M > 0 the decoder prompt table [tasks, M, d_model], whose
  rows are prepended to the decoder input (t5x prompt-tuning's decoder-side prompts);
- `init`: initialisers (a token's embedding, sampled vocabulary rows, a text, a file);
- `files`: a prompt saved on its own with its placement and its backbone's fingerprint.
"""
from cpm2_jax.prompts.config import PromptConfig  # noqa: F401
