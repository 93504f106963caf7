"""Register every CPM-2 task and mixture with seqio by name (`register_all`, idempotent).

Names: `cpm2_pretrain_zh`, `cpm2_pretrain_en`, mixture `cpm2_pretrain_bilingual` (2:1);
downstream `cpm2_ccpm`, `cpm2_c3`, `cpm2_lcqmc`, `cpm2_wmt20_en_zh`, `cpm2_math23k`,
`cpm2_lcsts`, `cpm2_adgen`, `cpm2_sogou_log`, `cpm2_sogou_log_rank`; local `en_zh`,
`man_summary_zh`, `poem_next_line`, `translation_match`. All share the configured
vocabulary (`settings.default_vocabulary`), resolved at first use, and read their
directories when a dataset is built, so registering touches no file.
"""
from __future__ import annotations

import seqio

from cpm2_jax.tasks import downstream, local, pretraining, text_to_text

_registered = False


def register_all(vocabulary: seqio.Vocabulary | None = None, force: bool = False) -> None:
    """Register (or, with `force` or a `vocabulary`, re-register) all tasks and mixtures."""
    global _registered
    if _registered and not force and vocabulary is None:
        return
    pretraining.register(vocabulary)
    text_to_text.register(downstream.specs() + local.specs(), vocabulary)
    _registered = True


def task_names() -> list[str]:
    register_all()
    return sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())


def spec(name: str) -> text_to_text.TaskSpec | None:
    """The text-to-text spec of a fine-tuning task (None for pre-training ones)."""
    return {s.name: s for s in downstream.specs() + local.specs()}.get(name)


register_all()
