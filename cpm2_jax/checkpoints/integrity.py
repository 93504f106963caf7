"""Detecting a damaged checkpoint: per-array fingerprints and orbax read errors.

Orbax reads a chunk whose bytes were overwritten without complaint (arrays are stored raw),
so every save records a fingerprint per array in the step's config item,

    fingerprint(x) = (sum over elements of x's bit pattern as an unsigned integer) mod 2**32,

computed before saving (one reduction per array, on device or in place on the host) and
recomputed after a restore. A truncated file, a missing `_METADATA` or a broken index fails
inside orbax/tensorstore instead; `describe_read_error` turns either into one line naming the file.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from cpm2_jax import param_paths
from cpm2_jax.errors import CheckpointError

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _device_fingerprint(x):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:  # two 32-bit halves (only with x64 enabled)
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(_UNSIGNED[size]))
    return jnp.sum(x.astype(jnp.uint32), dtype=jnp.uint32)


def _host_fingerprint(x: np.ndarray) -> int:
    """`_device_fingerprint` of a host array, read in place: numpy reduces the unsigned view in
    small buffered blocks (a sum mod 2**64, so mod 2**32 it is the device's uint32 sum)."""
    unsigned = x.view(_UNSIGNED[x.dtype.itemsize])
    return int(np.sum(unsigned, dtype=np.uint64)) % 2**32


def fingerprints(tree) -> dict[str, int]:
    """{array name: fingerprint} of a tree of (sharded) jax or numpy arrays.

    Host (numpy) arrays of up to 4-byte items are summed where they lie, one at a time, so
    fingerprinting a converted model never copies it (a device program would first transfer
    the whole tree); jax arrays (and 8-byte host ones, which jax narrows without x64) go
    through one jitted reduction on their devices. Both give the same value for the same bytes.
    """
    import jax

    flat = param_paths.flatten(tree)
    names = [k for k, v in flat.items() if hasattr(v, "shape") and hasattr(v, "dtype")]
    on_host = [k for k in names if isinstance(flat[k], np.ndarray) and flat[k].dtype.itemsize <= 4]
    out = {k: _host_fingerprint(flat[k]) for k in on_host}
    on_device = [k for k in names if k not in out]
    if on_device:
        values = jax.jit(lambda xs: [_device_fingerprint(x) for x in xs])([flat[k] for k in on_device])
        out.update({k: int(v) for k, v in zip(on_device, jax.device_get(values))})
    return {k: out[k] for k in names}


def verify(restored: Mapping[str, Any], expected: Mapping[str, int], where: str) -> None:
    """Raises CheckpointError naming the first restored array whose fingerprint differs."""
    names = [k for k in restored if k in expected]
    if not names:
        return
    found = fingerprints({k: restored[k] for k in names})
    bad = [k for k in names if found[k] != int(expected[k])]
    if bad:
        raise CheckpointError(f"checkpoint {where} is damaged: array {bad[0]!r} does not match the fingerprint "
                              f"recorded when it was saved ({len(bad)} array(s) differ); its files under "
                              f"{where}/state were changed or overwritten")


def describe_read_error(err: BaseException, where: str) -> str:
    """One line for an orbax/tensorstore read failure: the file it names, else the first line."""
    import re

    text = " ".join(str(err).split())
    file = re.search(r'local file "([^"]+)"', text)
    tail = re.search(r"(Requested byte range[^\[]*\[[^\]]*\)[^:;\[]*|Error decoding[^:;\[]*|does not exist)", text)
    reason = tail.group(1).strip() if tail else text[:300]
    named = f"{file.group(1)}: " if file else ""
    return f"checkpoint {where} is unreadable: {named}{reason}"


_installed = False


def quiet_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore futures still finishing call back into orbax's closed
    event loop ("RuntimeError: Event loop is closed", printed as unraisable tracebacks):
    drop exactly those, pass everything else to the previous hook."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        value = getattr(unraisable, "exc_value", None)
        if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True
