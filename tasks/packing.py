"""Rows of examples -> t5x model features, with packing whose carry-over is resumable.

`Packer` fills one row at a time greedily: examples are appended while both their inputs
and targets still fit; the first that does not opens the next row. The only state between
rows is that pending example (a few hundred token ids), so `state()` stores it verbatim.

`to_features` gives what seqio's `EncDecFeatureConverter` gives (checked against it in the
tests): encoder_input_tokens, decoder_target_tokens, decoder_input_tokens (targets shifted
right by one, within each segment when packed: 0 at a segment's start), decoder_loss_weights (1 on real
target tokens), and with packing *_segment_ids (1, 2, ... per example, 0 on padding) and
*_positions (0, 1, ... within each example).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cpm2_jax.tasks.streams import Example, ExampleStream


class Packer:
    """Rows of one example (`pack=False`) or of as many whole examples as fit (`pack=True`)."""

    def __init__(self, stream: ExampleStream, lengths: Mapping[str, int], pack: bool):
        self.stream, self.lengths, self.pack = stream, dict(lengths), pack
        self._pending: Example | None = None

    def _fits(self, row: list[Example], example: Example) -> bool:
        return all(sum(len(e[k]) for e in row) + len(example[k]) <= self.lengths[k] for k in self.lengths)

    def next_row(self) -> list[Example]:
        row: list[Example] = []
        if self._pending is not None:
            row.append(self._pending)
            self._pending = None
        while True:
            if row and not self.pack:
                return row
            try:
                example = self.stream.next_example()
            except StopIteration:
                if row:
                    return row
                raise
            if not row or self._fits(row, example):
                row.append(example)
            else:
                self._pending = example
                return row

    def state(self) -> dict[str, Any]:
        pending = None if self._pending is None else {k: v.tolist() for k, v in self._pending.items()}
        return {"pending": pending}

    def restore(self, state: Mapping[str, Any]) -> None:
        pending = state.get("pending")
        self._pending = None if pending is None else {k: np.asarray(v, np.int32) for k, v in pending.items()}


def to_features(rows: Sequence[Sequence[Example]], lengths: Mapping[str, int], pack: bool) -> dict[str, np.ndarray]:
    """Model features of a batch of rows (each a list of examples), padded with 0."""
    n = len(rows)
    enc_len, dec_len = lengths["inputs"], lengths["targets"]
    out = {name: np.zeros((n, length), np.int32) for name, length in (
        ("encoder_input_tokens", enc_len), ("encoder_segment_ids", enc_len), ("encoder_positions", enc_len),
        ("decoder_target_tokens", dec_len), ("decoder_input_tokens", dec_len), ("decoder_segment_ids", dec_len),
        ("decoder_positions", dec_len))}
    for r, row in enumerate(rows):
        for side, key in (("encoder", "inputs"), ("decoder", "targets")):
            start = 0
            for segment, example in enumerate(row, start=1):
                tokens = example[key]
                end = start + len(tokens)
                token_name = "encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"
                out[token_name][r, start:end] = tokens
                out[f"{side}_segment_ids"][r, start:end] = segment
                out[f"{side}_positions"][r, start:end] = np.arange(len(tokens))
                if side == "decoder":
                    out["decoder_input_tokens"][r, start + 1:end] = tokens[:-1]
                start = end
    out["decoder_loss_weights"] = (out["decoder_target_tokens"] > 0).astype(np.int32)
    if not pack and n and all(row and "task_index" in row[0] for row in rows):
        # Unpacked rows of a mixture: each row's task (its prompt, cpm2_jax.prompts).
        out["task_index"] = np.asarray([int(row[0]["task_index"]) for row in rows], np.int32)
    if not pack:  # seqio shifts the whole row here, so the EOS also moves into the first padding slot
        out["decoder_input_tokens"][:, 1:] = out["decoder_target_tokens"][:, :-1]
        for name in ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions"):
            del out[name]
    return out
