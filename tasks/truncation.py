"""Trim to the feature length, append EOS, and count what was cut.

seqio's `append_eos_after_trim` truncates silently; this one also sets, per feature,
`<feature>_truncated` (1 when tokens were dropped, else 0). The batch iterator sums these
flags into its `stats()` (`truncated_inputs`, `truncated_targets`), so a trainer can log
how much data the feature lengths cut away. Feature converters ignore the extra keys.
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

TRUNCATED_SUFFIX = "_truncated"


def truncated_key(feature: str) -> str:
    return feature + TRUNCATED_SUFFIX


def append_eos_after_trim_counted(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                                  sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
    """seqio preprocessor: keep `length - 1` tokens, append EOS, flag truncated examples."""

    def process(example):
        out = dict(example)
        for key, feature in output_features.items():
            if key not in example or not feature.add_eos:
                continue
            tokens = example[key]
            eos = tf.constant([feature.vocabulary.eos_id], tokens.dtype)
            if sequence_length is not None and sequence_length.get(key) is not None:
                keep = sequence_length[key] - 1
                out[truncated_key(key)] = tf.cast(tf.size(tokens) > keep, tf.int32)
                tokens = tokens[:keep]
            else:
                out[truncated_key(key)] = tf.constant(0, tf.int32)
            out[key] = tf.concat([tokens, eos], axis=0)
        return out

    return dataset.map(process, num_parallel_calls=tf.data.AUTOTUNE)
