"""Imports TensorFlow (pulled in by seqio) without its C++ start-up chatter on stderr.

TensorFlow's native libraries log "oneDNN custom operations are on" and "Could not find
cuda drivers" through absl before any Python setting can silence them (TF_CPP_MIN_LOG_LEVEL
does not reach them). The `cpm2` binaries call `quiet_tensorflow_import()` first, so a
user sees their own output and errors, not that. Import errors still surface unchanged.
"""
from __future__ import annotations

import os
import sys


def quiet_tensorflow_import() -> None:
    """Imports tensorflow once with file descriptor 2 pointed at /dev/null."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
