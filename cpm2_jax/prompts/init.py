"""Initial prompt vectors (encoder and decoder prompts), read from the backbone's token embedding.

CPM2_FACTS "Prompt tuning": initialised from the embedding of the mask token, or sampled
from vocabulary rows; also the embedding of a text (repeated to fill N), or a prompt file.
These run after the backbone is restored (the embedding must be the trained one), which is
why they are not the table's Flax initialiser (that one is `normal`, the model's own).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from cpm2_jax.errors import ConfigError

# 'vocab' samples from the most frequent pieces: ids below this (t5x prompt-tuning samples
# the first 5,000 rows) and above the specials (pad 0, EOS 1, UNK 2).
SAMPLE_POPULATION = 5000
FIRST_REGULAR_ID = 3


def _embedding(params: Mapping) -> np.ndarray:
    import jax

    try:
        table = params["token_embedder"]["embedding"]
    except (KeyError, TypeError):
        raise ConfigError("prompt initialisation needs the backbone's token_embedder/embedding") from None
    return np.asarray(jax.device_get(getattr(table, "value", table)), np.float32)


def _tile(rows: np.ndarray, length: int) -> np.ndarray:
    return rows[np.arange(length) % rows.shape[0]]


def text_ids(text, vocabulary=None) -> list[int]:
    """Token ids of a prompt text: a list of ids as given, or a string tokenised by `vocabulary`
    (default: the CPM2_VOCAB vocabulary of the data tasks)."""
    if isinstance(text, (list, tuple)):
        ids = [int(t) for t in text]
    else:
        if vocabulary is None:
            from cpm2_jax.tasks.settings import default_vocabulary

            vocabulary = default_vocabulary()
        ids = list(vocabulary.encode(text))
    if not ids:
        raise ConfigError("PromptConfig.init_text is empty: give a text or token ids for init='text'")
    return ids


def initial_table(params: Mapping, model_config, *, vocabulary=None, fingerprint: Optional[str] = None
                  ) -> Optional[np.ndarray]:
    """[num_tasks, N, d_model] float32 initial prompt from the backbone in `params`, or None
    for init='normal' (keep the table's own initialisation)."""
    tables = initial_tables(params, model_config, vocabulary=vocabulary, fingerprint=fingerprint)
    return None if tables is None else tables["table"]


def initial_tables(params: Mapping, model_config, *, vocabulary=None, fingerprint: Optional[str] = None
                   ) -> Optional[dict]:
    """{"table": [num_tasks, N, d_model], and with a decoder prompt "decoder_table":
    [num_tasks, M, d_model]} float32, both from the same initialiser (the decoder rows of
    'vocab' are drawn after the encoder rows, of 'text' the text repeated to M, of 'file' the
    file's decoder vectors); None for init='normal'."""
    p = model_config.prompt
    lengths = {"table": p.length, **({"decoder_table": p.decoder_length} if p.decoder_length else {})}
    shapes = {k: (p.num_tasks, n, model_config.d_model) for k, n in lengths.items()}
    if p.init == "normal":
        return None
    if p.init == "file":
        from cpm2_jax.prompts import files

        loaded = files.load_prompt(p.init_file)
        files.check_backbone(loaded, model_config, fingerprint)
        found = {"table": loaded.vectors, "decoder_table": loaded.decoder_vectors}
        out = {}
        for key, shape in shapes.items():
            vectors = found[key]
            if vectors is None or vectors.shape != shape[1:]:
                what = "vectors" if key == "table" else "decoder vectors"
                field = "length" if key == "table" else "decoder_length"
                count = 0 if vectors is None else vectors.shape[0]
                raise ConfigError(f"prompt file {loaded.source!r} holds {count} {what}, "
                                  f"PromptConfig.{field} is {lengths[key]}")
            out[key] = np.broadcast_to(vectors, shape).copy()
        return out
    embedding = _embedding(params)
    vocab = embedding.shape[0]
    if p.init == "token":
        token = p.init_token if p.init_token >= 0 else vocab - 1
        if not 0 <= token < vocab:
            raise ConfigError(f"PromptConfig.init_token {p.init_token} is outside the vocabulary [0, {vocab})")
        return {k: np.broadcast_to(embedding[token], shape).copy() for k, shape in shapes.items()}
    if p.init == "vocab":
        high = min(vocab, SAMPLE_POPULATION)
        rng = np.random.default_rng(p.init_seed)
        return {k: embedding[rng.integers(min(FIRST_REGULAR_ID, high - 1), high, size=shape[:2])]
                for k, shape in shapes.items()}
    if p.init == "text":
        ids = text_ids(p.init_text, vocabulary)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"PromptConfig.init_text has token id {bad[0]} outside the vocabulary [0, {vocab})")
        rows = embedding[np.asarray(ids)]
        return {k: np.broadcast_to(_tile(rows, shape[1]), shape).copy() for k, shape in shapes.items()}
    raise ConfigError(f"unknown PromptConfig.init {p.init!r}")


def initialize(params: Mapping, model_config, *, vocabulary=None, fingerprint: Optional[str] = None) -> dict:
    """params with `prompt/table` (and `prompt/decoder_table`) set by the configured
    initialiser (each in its sharding)."""
    import jax

    tables = initial_tables(params, model_config, vocabulary=vocabulary, fingerprint=fingerprint)
    if tables is None:
        return dict(params)
    prompt = dict(params["prompt"])
    for key, table in tables.items():
        old = prompt[key]
        new = jax.numpy.asarray(table, old.dtype)
        if getattr(old, "sharding", None) is not None:
            new = jax.device_put(new, old.sharding)
        prompt[key] = new
    out = dict(params)
    out["prompt"] = prompt
    return out


def after_restore(params: Mapping, plan: Mapping[str, Optional[str]], model_config, log=None) -> Mapping:
    """After a partial restore (`checkpoints.restore_partial`): a prompt table that was not
    loaded from the checkpoint gets the configured initialiser, read from the restored
    backbone; a loaded one (two-stage tuning, resuming) is kept."""
    if model_config.prompt is None or plan.get("prompt/table") is not None:
        return params
    p = model_config.prompt
    params = initialize(params, model_config)
    if log is not None:
        what = {"token": f"token {p.init_token}", "vocab": f"vocabulary rows (seed {p.init_seed})",
                "text": "a text", "file": repr(p.init_file), "normal": "normal(0, init_std)"}[p.init]
        decoder = f" (+ {p.decoder_length} decoder vectors)" if p.decoder_length else ""
        log(f"prompt: {p.num_tasks} x {p.length} vectors{decoder} initialised from {what}")
    return params
