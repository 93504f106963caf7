"""Serving many tuned tasks from one backbone in one batch: prompt files become the rows of
the model's prompt table, and each input's `task` (an index or a prompt file's name) picks its
row, so every example of a batch gets its own prompt and placement."""
from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from cpm2_jax.errors import DataError

SUFFIX = ".prompt.npz"


def task_name(path) -> str:
    """'out/lcqmc.prompt.npz' -> 'lcqmc' (the name an input's `task` field may give)."""
    name = pathlib.Path(path).name
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else pathlib.Path(path).stem


def attach_prompts(params, config, prompt_paths: Sequence[str]):
    """(params with the files' prompts as the table, config serving them, task names): each
    file must have been tuned on this backbone (architecture and parameter fingerprint)."""
    from cpm2_jax.prompts import files

    loaded = [files.load_prompt(p) for p in prompt_paths]
    fingerprint = files.backbone_fingerprint(params)
    for f in loaded:
        files.check_backbone(f, config, fingerprint)
    config = config.replace(prompt=files.prompt_config_for(loaded, config.prompt))
    params = files.with_table(params, files.table_of(loaded), files.decoder_table_of(loaded))
    return params, config, [task_name(p) for p in prompt_paths]


def task_index_of(value: Any, names: Sequence[str], num_tasks: int, where: str) -> int:
    """An input's `task` field (an index, or a prompt name) -> its row of the prompt table."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: task must be an index or a prompt name, got {value!r:.40}")
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in names:
            known = ", ".join(names) if names else "none (the model's prompt has no names)"
            raise DataError(f"{where}: unknown task {value!r}; tasks are {known}")
        return list(names).index(value)
    index = int(value)
    if not 0 <= index < num_tasks:
        raise DataError(f"{where}: task index {index} is outside the prompt table's {num_tasks} task(s) "
                        f"(0..{num_tasks - 1})")
    return index


def check_example(input_ids: Sequence[int], task: int, prompt_config, where: str) -> None:
    """A single input against its task's placement (a middle prompt needs a `<sep>`)."""
    from cpm2_jax.prompts.placement import check_batch

    check_batch(np.asarray([list(input_ids)], np.int64), np.asarray([task]), prompt_config, where)


def resolve_tasks(examples: list[dict], prompt_config, names: Optional[Sequence[str]]) -> Optional[np.ndarray]:
    """Each example's task index (`record["task"]`, task 0 when absent), checked against the
    placement of its task; errors name the example's input line. None for a model without a
    prompt (where a `task` field is an error)."""
    if prompt_config is None:
        for e in examples:
            if "task" in e["record"]:
                raise DataError(f"{e.get('where', 'input')}: a task is given but the model has no prompt table "
                                f"(pass --prompt FILE)")
        return None
    tasks = []
    for e in examples:
        where = e.get("where", "input")
        value = e["record"].get("task", 0)
        task = task_index_of(value, list(names or []), prompt_config.num_tasks, where)
        check_example(e["input_ids"], task, prompt_config, where)
        tasks.append(task)
    return np.asarray(tasks, np.int32)
