"""Where training metrics go: TensorBoard event files (tensorboardX), a JSON Lines log and
a console progress bar with ETA (tqdm). Only process 0 writes."""
from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Mapping, Optional

import jax


class MetricsWriter:
    """`write(step, metrics, prefix)` to TensorBoard under `<dir>/<prefix>` and to `<dir>/metrics.jsonl`.

    `resume_step`: a run resumed from that step replays the steps after it, so the rows of
    metrics.jsonl after it are dropped (the file is rewritten atomically) and TensorBoard is
    told to purge its events after it; each step then has one row.
    """

    def __init__(self, log_dir: str | pathlib.Path, *, enabled: Optional[bool] = None,
                 resume_step: Optional[int] = None):
        self.log_dir = pathlib.Path(log_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.resume_step = resume_step
        self._writers = {}
        self._jsonl = None
        if self.enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                truncate_after(path, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")

    def _writer(self, prefix: str):
        if prefix not in self._writers:
            from tensorboardX import SummaryWriter

            purge = {} if self.resume_step is None else {"purge_step": self.resume_step + 1}
            self._writers[prefix] = SummaryWriter(str(self.log_dir / prefix), **purge)
        return self._writers[prefix]

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        writer = self._writer(prefix)
        for name, value in metrics.items():
            writer.add_scalar(f"{prefix}/{name}", float(value), step)
        record = {"step": int(step), "split": prefix}
        record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if not self.enabled:
            return
        for writer in self._writers.values():
            writer.flush()
        self._jsonl.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        for writer in self._writers.values():
            writer.close()
        self._jsonl.close()
        self.enabled = False


def truncate_after(path: pathlib.Path, step: int) -> None:
    """Drops the rows of a metrics.jsonl whose step is after `step` (temp file + rename); a
    line that is not a JSON object with a step (a torn last line after a kill) goes too."""
    import os
    import tempfile

    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None
        if row_step is not None and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if not dropped:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(tmp, path)


class ProgressBar:
    """tqdm bar over steps [start, total) showing loss, learning rate and tokens/s (process 0)."""

    def __init__(self, start: int, total: int, *, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)

    def update(self, steps: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        if self._bar is None:
            return
        if metrics:
            shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}",
                     "lr": f"{metrics.get('learning_rate', float('nan')):.2e}"}
            if "tokens_per_s" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif jax.process_index() == 0:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
