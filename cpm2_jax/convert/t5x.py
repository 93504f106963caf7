"""t5x checkpoints (Google's T5 1.1 / mT5 releases) -> the project's params.

A t5x checkpoint directory holds `checkpoint`, a msgpack (flax.serialization) of
{"version", "optimizer": {"target": params, "state": ...}}, where each large array is
replaced by its TensorStore spec, {"driver": "zarr", "kvstore": {"driver": "file" | "gcs",
"path": "target.encoder.layers_0.attention.query.kernel"}, "metadata": ...}, relative to the
directory (small arrays may sit in the msgpack itself). Names are t5x's `examples/t5/network`:
the project uses the same tree, except that t5x's DenseGeneral keeps 2-D kernels and the MLP
weights carry a `kernel` leaf:
    attention/{query,key,value}/kernel [d, h*k]  -> [d, h, k];   out/kernel [h*k, d] -> [h, k, d]
    mlp/{wi_0,wi_1,wi,wo}/kernel                  -> mlp/{wi_0,wi_1,wi,wo}
T5 1.0 (no `decoder/logits_dense`) is the tied head, logits = (x * d**-0.5) . embedding^T,
as t5x computes it. Arrays are read one at a time (never the msgpack's optimizer state).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError

_ATTENTIONS = ("attention", "self_attention", "encoder_decoder_attention")
_MLP = ("wi_0", "wi_1", "wi", "wo")


def _is_spec(x: Any) -> bool:
    return isinstance(x, Mapping) and "driver" in x and ("kvstore" in x or "path" in x)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping) and not _is_spec(value):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def read_manifest(path: os.PathLike | str) -> tuple[pathlib.Path, dict[tuple[str, ...], Any]]:
    """(checkpoint directory, {param path under `target`: array or TensorStore spec}) of a t5x
    checkpoint directory (or its `checkpoint` file)."""
    from flax import serialization

    path = pathlib.Path(path).expanduser()
    file = path / "checkpoint" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no t5x `checkpoint` file at {str(file)!r}")
    raw = file.read_bytes()
    if raw.startswith(b"model_checkpoint_path"):
        raise CheckpointError(f"{str(file)!r} is a TensorFlow checkpoint index, not a t5x (msgpack) checkpoint")
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as err:  # noqa: BLE001 - msgpack raises several types on bad bytes
        raise CheckpointError(f"cannot decode t5x checkpoint {str(file)!r} as msgpack: {err}") from None
    if not isinstance(contents, Mapping):
        raise CheckpointError(f"t5x checkpoint {str(file)!r} does not hold a dict")
    state = contents.get("optimizer", contents) if contents.get("version", 0) else contents
    target = state.get("target") if isinstance(state, Mapping) else None
    if not isinstance(target, Mapping):
        raise CheckpointError(f"t5x checkpoint {str(file)!r} has no 'optimizer/target' parameter tree")
    return file.parent, _flatten(target)


def _local_spec(spec: Mapping, directory: pathlib.Path, name: str) -> dict:
    """The spec with its relative path made absolute under `directory`; gcs/gfile -> file."""
    spec = dict(spec)
    kvstore = dict(spec.get("kvstore") or {})
    relative = kvstore.get("path", spec.pop("path", None))
    if not relative:
        raise CheckpointError(f"t5x array {name!r}: TensorStore spec has no path")
    if kvstore.get("driver", "file") not in ("file", "gfile", "gcs"):
        raise CheckpointError(f"t5x array {name!r}: unsupported TensorStore kvstore driver {kvstore['driver']!r}")
    full = (directory / relative).resolve()
    if directory.resolve() not in full.parents:
        raise CheckpointError(f"t5x array {name!r} points outside the checkpoint directory: {relative!r}")
    spec["kvstore"] = {"driver": "file", "path": str(full)}
    return spec


def read_array(value: Any, directory: pathlib.Path, name: str) -> np.ndarray:
    """A t5x leaf as numpy: the msgpack's own array, or the TensorStore array its spec names."""
    if not _is_spec(value):
        return np.asarray(value)
    import tensorstore as ts

    spec = _local_spec(value, directory, name)
    try:
        return np.asarray(ts.open(spec, open=True).result().read().result())
    except Exception as err:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
        raise CheckpointError(f"cannot read t5x array {name!r} from {spec['kvstore']['path']!r}: "
                              f"{str(err).splitlines()[0][:200]}") from None


def _shape(value: Any) -> tuple[int, ...]:
    if _is_spec(value):
        shape = (value.get("metadata") or {}).get("shape")
        if shape is None:
            raise CheckpointError(f"TensorStore spec without metadata.shape: {value}")
        return tuple(int(n) for n in shape)
    return tuple(int(n) for n in np.shape(value))


def config_from_manifest(manifest: Mapping[tuple[str, ...], Any], **overrides) -> ModelConfig:
    """The ModelConfig of a t5x mT5 / T5 1.1 (or 1.0) parameter tree, from shapes alone."""
    def shape(*path):
        if path not in manifest:
            raise CheckpointError(f"t5x checkpoint lacks parameter 'target/{'/'.join(path)}'")
        return _shape(manifest[path])

    if any(p[1] == "layers" for p in manifest if len(p) > 1):
        raise CheckpointError("t5x checkpoint has scanned layers (encoder/layers/...); only per-layer "
                              "(layers_0, layers_1, ...) checkpoints as Google released them are read")
    vocab, d = shape("token_embedder", "embedding")
    heads, buckets = shape("encoder", "relpos_bias", "rel_embedding")
    inner = shape("encoder", "layers_0", "attention", "query", "kernel")[1]
    gated = ("encoder", "layers_0", "mlp", "wi_0", "kernel") in manifest
    d_ff = shape("encoder", "layers_0", "mlp", "wi_0" if gated else "wi", "kernel")[1]
    layers = {s: len({p[1] for p in manifest if p[0] == s and p[1].startswith("layers_")})
              for s in ("encoder", "decoder")}
    fields = dict(vocab_size=vocab, d_model=d, d_ff=d_ff, num_heads=heads, head_dim=inner // heads,
                  num_encoder_layers=layers["encoder"], num_decoder_layers=layers["decoder"],
                  relative_attention_num_buckets=buckets, ffn_activation="gated_gelu" if gated else "relu",
                  tie_word_embeddings=("decoder", "logits_dense", "kernel") not in manifest)
    fields.update(overrides)
    return ModelConfig().replace(**fields)


def project_path(t5x_path: tuple[str, ...]) -> tuple[str, ...]:
    """The project's path of a t5x parameter path (under `target`)."""
    if len(t5x_path) >= 3 and t5x_path[-3] == "mlp" and t5x_path[-2] in _MLP and t5x_path[-1] == "kernel":
        return t5x_path[:-1]
    return t5x_path


def to_project(t5x_path: tuple[str, ...], x: np.ndarray, c: ModelConfig) -> np.ndarray:
    """A t5x array in the project's shape (attention kernels split into heads)."""
    if len(t5x_path) >= 3 and t5x_path[-3] in _ATTENTIONS and t5x_path[-1] == "kernel":
        if t5x_path[-2] == "out":
            return x.reshape(c.num_heads, c.head_dim, x.shape[-1])
        return x.reshape(x.shape[0], c.num_heads, c.head_dim)
    return x


def load_t5x_checkpoint(path: os.PathLike | str, *, param_dtype: str = "float32",
                        **overrides) -> tuple[dict, ModelConfig]:
    """(params as nested numpy arrays, unscanned, config) of a t5x checkpoint directory; every
    missing, unexpected or wrong-shaped parameter is named in one CheckpointError."""
    from cpm2_jax.checkpoints.restore import abstract_params
    from cpm2_jax.convert.native import flatten_params, nest_params

    directory, manifest = read_manifest(path)
    config = config_from_manifest(manifest, param_dtype=param_dtype, **overrides)
    expected = {p: tuple(s.shape) for p, s in flatten_params(abstract_params(config)).items()}
    mapped = {project_path(p): p for p in manifest}
    problems = [f"unexpected parameter 'target/{'/'.join(p)}'" for q, p in mapped.items() if q not in expected]
    problems += [f"missing parameter {'/'.join(q)!r}" for q in expected if q not in mapped]
    for q, p in mapped.items():
        if q in expected and int(np.prod(_shape(manifest[p]))) != int(np.prod(expected[q])):
            problems.append(f"parameter 'target/{'/'.join(p)}': shape {_shape(manifest[p])} does not fit {expected[q]}")
    if problems:
        raise CheckpointError(f"t5x checkpoint {str(directory)!r} does not match the inferred config "
                              f"(d_model {config.d_model}, {config.num_heads} heads, {config.num_encoder_layers}+"
                              f"{config.num_decoder_layers} layers): {'; '.join(problems[:6])}")
    import jax.numpy as jnp

    dtype = jnp.dtype(param_dtype)
    out = {}
    for q, p in mapped.items():
        x = to_project(p, read_array(manifest[p], directory, "target/" + "/".join(p)), config)
        out[q] = np.ascontiguousarray(x.reshape(expected[q]).astype(dtype))
    return nest_params(out), config


def describe(config: ModelConfig, source: Optional[str] = None) -> dict:
    return {"source": source, "vocab_size": config.vocab_size, "d_model": config.d_model, "d_ff": config.d_ff,
            "num_heads": config.num_heads, "layers": [config.num_encoder_layers, config.num_decoder_layers],
            "ffn_activation": config.ffn_activation, "tie_word_embeddings": config.tie_word_embeddings}
