"""Write an output directory all-or-nothing: build it in a sibling temp dir, then rename.

A failed export therefore leaves nothing half-written, and an existing non-empty
directory is only replaced when the caller passes `overwrite=True`.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from cpm2_jax.errors import CheckpointError


def check_writable(path: os.PathLike | str, overwrite: bool) -> pathlib.Path:
    """The output path, refusing an existing file or non-empty directory unless `overwrite`."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output path {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {str(path)!r} exists and is not empty; pass overwrite=True "
                              "(--overwrite on the command line) to replace it")
    return path


@contextlib.contextmanager
def atomic_directory(path: os.PathLike | str, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a temp directory beside `path`; on success it becomes `path`, on error it is removed."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
