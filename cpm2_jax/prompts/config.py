"""What a prompt is: its length, its tasks, where it sits in each task's input, its mask and
its initialiser (CPM2_FACTS "Prompt tuning": 100 vectors; front, middle, back or split by a
ratio list; initialised from the mask token's embedding or sampled vocabulary rows).

Set as `ModelConfig.prompt` (gin: `cpm2_jax.model_config.prompt = @cpm2_jax.prompts.PromptConfig()`);
the model then holds a prompt table [num_tasks, length, d_model] and every example picks
its row by a `task_index` feature (0 when absent).

Optional decoder prompts (`decoder_length` > 0, default 0 = none), as google-research/
prompt-tuning's `PromptDecoder`: a second table [num_tasks, decoder_length, d_model]
(`prompt/decoder_table`, trained and saved with the encoder prompt) whose row is prepended to
the decoder's input after the target embedding shift, [P_1..P_M, <start>, y_1, ..., y_{T-1}];
the decoder attends causally over the whole row (relative positions are offsets in it) and
the logits of the M prompt positions are dropped, so the loss, scores and outputs keep the
targets' shape. Decoding writes the prompt's keys/values into the KV cache once
(`EncoderDecoder.prefill_decoder_prompt`) and steps from position M.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Union

import gin

from cpm2_jax.errors import ConfigError, closest

# Anchors a prompt can sit at: before the first token, right after the pair separator
# `<sep>` (the data marks sentence pairs with it), after the last (non-pad) token.
PLACES = ("front", "middle", "back")
# Encoder attention variants of the paper: every position sees every valid one; prompt
# queries see only prompt keys ("prompt cannot see text"); text queries see only text keys
# ("text cannot see prompt").
MASKS = ("full", "prompt_blind", "text_blind")
INITS = ("token", "vocab", "text", "file", "normal")
# Trainable-pattern (optim.trainable_mask) of everything but the prompt: the second stage of
# two-stage tuning with the tuned prompt kept fixed. "prompt" alone trains the prompt only.
BACKBONE_PATTERN = r"(?!prompt(/|$)).*"
SEP_ID = 3  # tasks/: sentence-pair tasks put <sep> (id 3) between the sentences


def parse_placement(spec: str, length: int) -> tuple[int, int, int]:
    """'front' | 'middle' | 'back' | 'front:1+middle:1+back:2' (a ratio list; 'front+back' = equal
    parts) -> prompt vectors at (front, middle, back), summing to `length`.

    The split is by largest remainder, ties to the earlier place, so counts are exact integers.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"PromptConfig.placement: a placement is a string such as 'front' or "
                          f"'front:1+middle:2', got {spec!r}")
    ratios = {}
    for part in spec.replace(" ", "").split("+"):
        place, _, ratio = part.partition(":")
        if place not in PLACES:
            raise ConfigError(f"PromptConfig.placement {spec!r}: unknown place {place!r}{closest(place, PLACES)}; "
                              f"places are {', '.join(PLACES)}")
        if place in ratios:
            raise ConfigError(f"PromptConfig.placement {spec!r}: place {place!r} is given twice")
        try:
            value = float(ratio) if ratio else 1.0
        except ValueError:
            raise ConfigError(f"PromptConfig.placement {spec!r}: ratio {ratio!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"PromptConfig.placement {spec!r}: ratio of {place!r} must be > 0, got {ratio}")
        ratios[place] = value
    total = sum(ratios.values())
    exact = {p: length * r / total for p, r in ratios.items()}
    counts = {p: int(exact[p]) for p in ratios}
    order = sorted(ratios, key=lambda p: (-(exact[p] - counts[p]), PLACES.index(p)))
    for p in order[:length - sum(counts.values())]:
        counts[p] += 1
    return tuple(counts.get(p, 0) for p in PLACES)


@gin.configurable(module="cpm2_jax.prompts")
@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """N prompt vectors per task in the encoder input.

    `placement`: one spec for every task, or one per task (see `parse_placement`).
    `sep_id`: the pair separator that 'middle' prompts follow. `mask`: one of MASKS.
    `init`: 'token' (the embedding of `init_token`; -1 = the last id of the model's
    vocabulary, where the sentinels / mask tokens start), 'vocab' (rows sampled from the
    embedding with `init_seed`), 'text' (the embedding of `init_text`, a string tokenised by
    the CPM2_VOCAB vocabulary or a list of ids, repeated to fill the length), 'file' (a prompt
    file, `init_file`), 'normal' (the model's normal(0, init_std)).
    `decoder_length`: vectors per task prepended to the decoder input (0 = no decoder prompt;
    initialised as the encoder prompt is, trained with it).
    """

    length: int = 100
    num_tasks: int = 1
    placement: Union[str, Sequence[str]] = "front"
    sep_id: int = SEP_ID
    mask: str = "full"
    init: str = "token"
    init_token: int = -1
    init_text: Union[str, Sequence[int]] = ""
    init_file: str = ""
    init_seed: int = 0
    decoder_length: int = 0

    def __post_init__(self):
        # Lists from gin or JSON become tuples: the config is hashed (a static jit argument).
        for name in ("placement", "init_text"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if self.length < 1 or self.num_tasks < 1:
            raise ConfigError(f"PromptConfig.length and num_tasks must be >= 1, got {self.length}, {self.num_tasks}")
        if self.decoder_length < 0:
            raise ConfigError(f"PromptConfig.decoder_length must be >= 0 (0 = no decoder prompt), got {self.decoder_length}")
        if self.mask not in MASKS:
            raise ConfigError(f"PromptConfig.mask {self.mask!r} is unknown{closest(self.mask, MASKS)}; "
                              f"known: {', '.join(MASKS)}")
        if self.init not in INITS:
            raise ConfigError(f"PromptConfig.init {self.init!r} is unknown{closest(self.init, INITS)}; "
                              f"known: {', '.join(INITS)}")
        if isinstance(self.placement, tuple) and len(self.placement) not in (1, self.num_tasks):
            raise ConfigError(f"PromptConfig.placement gives {len(self.placement)} placements for "
                              f"{self.num_tasks} tasks: give one for all or one per task")
        self.counts()  # validates every spec

    def placements(self) -> tuple[str, ...]:
        """One placement spec per task."""
        specs = self.placement if isinstance(self.placement, tuple) else (self.placement,)
        return specs * self.num_tasks if len(specs) == 1 else specs

    def counts(self) -> tuple[tuple[int, int, int], ...]:
        """Per task, prompt vectors at (front, middle, back)."""
        return tuple(parse_placement(spec, self.length) for spec in self.placements())

    def uses_middle(self, task: int) -> bool:
        return self.counts()[task][1] > 0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, fields: Mapping) -> "PromptConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"PromptConfig has no field {unknown[0]!r}{closest(unknown[0], known)}")
        return cls(**dict(fields))


def as_prompt_config(value) -> "PromptConfig | None":
    """None, a PromptConfig, or its dict (a checkpoint's recorded model config) -> PromptConfig."""
    if value is None or isinstance(value, PromptConfig):
        return value
    if isinstance(value, Mapping):
        return PromptConfig.from_dict(value)
    raise ConfigError(f"ModelConfig.prompt must be a PromptConfig (or its fields), got {type(value).__name__}")
