"""The CPM-2 encoder-decoder in Flax Linen (mT5 / T5 v1.1 layout, CPM2_FACTS "Dense model")."""
from cpm2_jax.model.transformer import Decoder, Encoder, EncoderDecoder  # noqa: F401
