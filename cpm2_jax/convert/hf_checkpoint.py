"""transformers T5-family checkpoints <-> the project's params, driven by one tensor table.

A model's converter (`hf_mt5`, `hf_switch`) lists every HF tensor as an `HFTensor`: its key,
its place in the project's tree and the reshaping between them. Both directions read that
table, so they cannot drift apart:
  torch Linear weights are [out, in]: q/k/v [heads*head_dim, d] -> kernel [d, heads, head_dim];
  o [d, heads*head_dim] -> kernel [heads, head_dim, d]; FFN/router/lm_head weights are transposed;
  relative_attention_bias [buckets, heads] -> rel_embedding [heads, buckets].
Per-layer tensors stack on a leading `layers` axis when scanned; per-expert tensors (one HF
tensor per expert) stack on the `expert` axis after it. Files are read without unpickling:
safetensors, or torch.load(weights_only=True); directories are written all-or-nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.convert.atomic import atomic_directory
from cpm2_jax.convert.native import flatten_params, nest_params
from cpm2_jax.errors import CheckpointError

SHARED = "shared.weight"
# Copies of `shared.weight` that transformers writes (or keeps in state_dict()); one input embedding.
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_MAX_LISTED_PROBLEMS = 6


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor: key, shape, project path (unscanned layout), reshaping kind and stack indices.

    kind: "copy" (same shape), "transpose" (2-D), "heads_in" ([h*k, d] <-> [d, h, k]) or
    "heads_out" ([d, h*k] <-> [h, k, d]).
    """

    hf_key: str
    path: tuple[str, ...]
    kind: str
    hf_shape: tuple[int, ...]
    layer: Optional[int] = None  # the layer index for per-layer tensors (stacked when scanned)
    expert: Optional[int] = None  # the expert index for per-expert tensors (always stacked)


def _project_shape(t: HFTensor, c: ModelConfig) -> tuple[int, ...]:
    if t.kind == "copy":
        return t.hf_shape
    if t.kind == "transpose":
        return t.hf_shape[::-1]
    if t.kind == "heads_in":
        return (t.hf_shape[1], c.num_heads, c.head_dim)
    return (c.num_heads, c.head_dim, t.hf_shape[0])  # heads_out


def _to_project(t: HFTensor, x: np.ndarray, c: ModelConfig) -> np.ndarray:
    if t.kind == "copy":
        return x
    if t.kind == "transpose":
        return x.T
    if t.kind == "heads_in":
        return x.T.reshape(x.shape[1], c.num_heads, c.head_dim)
    return x.T.reshape(c.num_heads, c.head_dim, x.shape[0])


def _to_hf(t: HFTensor, x: np.ndarray) -> np.ndarray:
    if t.kind == "copy":
        return x
    if t.kind == "transpose":
        return x.T
    if t.kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1]).T


# ---------------------------------------------------------------------------------------------
# The T5 skeleton shared by MT5 and SwitchTransformers
# ---------------------------------------------------------------------------------------------

def _attention(prefix: str, path: tuple[str, ...], c: ModelConfig, layer: int) -> list[HFTensor]:
    inner, d = c.num_heads * c.head_dim, c.d_model
    out = [HFTensor(f"{prefix}.{hf}.weight", path + (name, "kernel"), "heads_in", (inner, d), layer)
           for hf, name in (("q", "query"), ("k", "key"), ("v", "value"))]
    out.append(HFTensor(f"{prefix}.o.weight", path + ("out", "kernel"), "heads_out", (d, inner), layer))
    return out


# (HF prefix of the FFN sub-layer, project layer path, config, stack, layer index) -> its tensors.
FeedForwardTable = Callable[[str, tuple, ModelConfig, str, int], list[HFTensor]]


def t5_tensor_map(config: ModelConfig, feed_forward: FeedForwardTable) -> list[HFTensor]:
    """Every tensor of a T5-layout encoder-decoder in HF state-dict order; the FFN sub-layers
    come from `feed_forward`; `lm_head.weight` only when the head is untied."""
    c = config
    d, buckets = c.d_model, c.relative_attention_num_buckets

    def norm(key, path, layer=None):
        return HFTensor(key, path, "copy", (d,), layer)

    out = [HFTensor(SHARED, ("token_embedder", "embedding"), "copy", (c.vocab_size, d))]
    for stack, layers in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
        self_attention = "attention" if stack == "encoder" else "self_attention"
        for i in range(layers):
            hf, path = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            out += _attention(f"{hf}.0.SelfAttention", path + (self_attention,), c, i)
            if i == 0:
                out.append(HFTensor(f"{hf}.0.SelfAttention.relative_attention_bias.weight",
                                    (stack, "relpos_bias", "rel_embedding"), "transpose", (buckets, c.num_heads)))
            out.append(norm(f"{hf}.0.layer_norm.weight", path + (f"pre_{self_attention}_layer_norm", "scale"), i))
            if stack == "decoder":
                out += _attention(f"{hf}.1.EncDecAttention", path + ("encoder_decoder_attention",), c, i)
                out.append(norm(f"{hf}.1.layer_norm.weight", path + ("pre_cross_attention_layer_norm", "scale"), i))
            out += feed_forward(f"{hf}.{1 if stack == 'encoder' else 2}", path, c, stack, i)
        out.append(norm(f"{stack}.final_layer_norm.weight", (stack, f"{stack}_norm", "scale")))
    if not c.tie_word_embeddings:
        out.append(HFTensor("lm_head.weight", ("decoder", "logits_dense", "kernel"), "transpose", (c.vocab_size, d)))
    return out


# ---------------------------------------------------------------------------------------------
# State dicts <-> params
# ---------------------------------------------------------------------------------------------

def _stored_path(t: HFTensor, scanned: bool) -> tuple[str, ...]:
    """Where the tensor lives in the tree: `layers_{i}` becomes `layers` (index i of axis 0) when scanned."""
    if scanned and t.layer is not None:
        return t.path[:1] + ("layers",) + t.path[2:]
    return t.path


def _stack_index(t: HFTensor, scanned: bool) -> tuple[int, ...]:
    """The tensor's index in its stored array's leading (layers, expert) axes."""
    return ((t.layer,) if scanned and t.layer is not None else ()) + ((t.expert,) if t.expert is not None else ())


def project_shapes(tensors: Iterable[HFTensor], config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter, in `config`'s layout (stacked axes first)."""
    base, extent = {}, {}
    for t in tensors:
        path, index = _stored_path(t, config.scan_layers), _stack_index(t, config.scan_layers)
        base[path] = _project_shape(t, config)
        extent[path] = tuple(max(a, i + 1) for a, i in zip(extent.get(path, (0,) * len(index)), index))
    return {path: extent[path] + shape for path, shape in base.items()}


def listed(problems: list[str]) -> str:
    more = len(problems) - _MAX_LISTED_PROBLEMS
    return "; ".join(problems[:_MAX_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(n) for n in x.shape)


def to_numpy(x) -> np.ndarray:
    """A numpy array from numpy, jax or torch data (bfloat16 torch tensors via float32, exactly)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def params_from_state_dict(state_dict: Mapping[str, Any], tensors: list[HFTensor], config: ModelConfig, *,
                           aliases: Mapping[str, str], ignored: Iterable[str] = (), describe: str) -> dict:
    """The project's params (nested numpy arrays in `config.param_dtype`) from an HF state dict.

    `aliases` maps keys that must equal another (tied copies) to it. Every missing, unexpected
    or wrong-shaped key is reported in one `CheckpointError` naming the key and both shapes.
    """
    import jax.numpy as jnp

    state = {k: v for k, v in state_dict.items() if k not in set(ignored)}
    problems = []
    for alias, canonical in aliases.items():
        if alias not in state:
            continue
        copy = state.pop(alias)
        if canonical not in state:
            state[canonical] = copy
        elif _shape(copy) != _shape(state[canonical]) or not np.array_equal(to_numpy(copy),
                                                                           to_numpy(state[canonical])):
            problems.append(f"key {alias!r} differs from {canonical!r}: the model ties them")
    expected = {t.hf_key: t for t in tensors}
    problems += [f"unexpected key {key!r} (found shape {_shape(state[key])})" for key in state if key not in expected]
    for t in tensors:
        if t.hf_key not in state:
            problems.append(f"missing key {t.hf_key!r} (expected shape {t.hf_shape})")
        elif _shape(state[t.hf_key]) != t.hf_shape:
            problems.append(f"key {t.hf_key!r}: expected shape {t.hf_shape}, found {_shape(state[t.hf_key])}")
    if problems:
        raise CheckpointError(f"HF checkpoint does not match the config ({describe}): {listed(problems)}")

    dtype = jnp.dtype(config.param_dtype)
    shapes = project_shapes(tensors, config)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for t in tensors:
        x = np.asarray(_to_project(t, to_numpy(state[t.hf_key]), config), dtype=dtype)
        path, index = _stored_path(t, config.scan_layers), _stack_index(t, config.scan_layers)
        if not index:
            flat[path] = np.ascontiguousarray(x)
            continue
        if path not in flat:
            flat[path] = np.empty(shapes[path], dtype)
        flat[path][index] = x
    return nest_params(flat)


def params_to_state_dict(params, tensors: list[HFTensor], config: ModelConfig, *, dtype: Optional[str] = None,
                         describe: str) -> dict[str, np.ndarray]:
    """HF state dict (contiguous numpy arrays, table order) from the project's params.

    `dtype` casts the output (default: the params' own). A params tree that does not match
    `config` raises `CheckpointError` naming the path.
    """
    import jax
    import jax.numpy as jnp

    flat = flatten_params(params)
    stacks = {p[1] for p in flat if len(p) > 2 and p[1].startswith("layers")}
    if stacks and ("layers" in stacks) != config.scan_layers:
        have = "scanned (encoder/layers/...)" if "layers" in stacks else "unscanned (encoder/layers_0/...)"
        raise CheckpointError(f"params have {have} layers but the config says scan_layers={config.scan_layers}")
    expected = project_shapes(tensors, config)
    problems = []
    for path, shape in expected.items():
        if path not in flat:
            problems.append(f"missing parameter {'/'.join(path)!r} (expected shape {shape})")
        elif _shape(flat[path]) != shape:
            problems.append(f"parameter {'/'.join(path)!r}: expected shape {shape}, found {_shape(flat[path])}")
    problems += [f"unexpected parameter {'/'.join(p)!r} (found shape {_shape(v)})"
                 for p, v in flat.items() if p not in expected]
    if problems:
        layout = "scanned" if config.scan_layers else "unscanned"
        raise CheckpointError(f"params do not match the config ({describe}, {layout} layers): {listed(problems)}")
    out_dtype = jnp.dtype(dtype) if dtype else None
    host = {path: np.asarray(jax.device_get(flat[path])) for path in expected}
    state = {}
    for t in tensors:
        x = _to_hf(t, host[_stored_path(t, config.scan_layers)][_stack_index(t, config.scan_layers)])
        state[t.hf_key] = np.ascontiguousarray(x if out_dtype is None else x.astype(out_dtype))
    return state


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------

def _read_safetensors(files: Iterable[pathlib.Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    state = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read safetensors file {str(file)!r}: {err}") from None
    return state


def _read_torch_bin(files: Iterable[pathlib.Path]) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading pytorch_model.bin needs torch; install it or convert the directory "
                              "to safetensors") from None
    state = {}
    for file in files:
        try:  # weights_only=True: tensors and plain containers only, never arbitrary pickled objects
            loaded = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
            raise CheckpointError(f"cannot load {str(file)!r} with torch.load(weights_only=True): {err}") from None
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{str(file)!r} does not hold a state dict")
        state.update(loaded)
    return state


def _shards(directory: pathlib.Path, index_name: str) -> list[pathlib.Path]:
    """The shard files named by a `*.index.json` weight map, each checked to lie inside `directory`."""
    try:
        weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"bad shard index {str(directory / index_name)!r}: {err}") from None
    files = []
    for name in sorted(set(weight_map.values())):
        if pathlib.PurePath(name).name != name:
            raise CheckpointError(f"shard index {index_name!r} names a file outside the directory: {name!r}")
        if not (directory / name).is_file():
            raise CheckpointError(f"shard {name!r} listed in {index_name!r} is missing from {str(directory)!r}")
        files.append(directory / name)
    return files


def read_hf_config(path: os.PathLike | str) -> dict[str, Any]:
    """The `config.json` dict of a transformers directory."""
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"HF checkpoint directory {str(directory)!r} does not exist")
    config_file = directory / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in HF checkpoint directory {str(directory)!r}") from None
    except ValueError as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON: {err}") from None


def read_hf_state_dict(path: os.PathLike | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, config.json dict) of a transformers directory: model.safetensors, sharded
    safetensors with an index, or pytorch_model.bin (only via torch.load(weights_only=True))."""
    hf_config = read_hf_config(path)
    directory = pathlib.Path(path).expanduser()
    if (directory / "model.safetensors").is_file():
        state = _read_safetensors([directory / "model.safetensors"])
    elif (directory / "model.safetensors.index.json").is_file():
        state = _read_safetensors(_shards(directory, "model.safetensors.index.json"))
    elif (directory / "pytorch_model.bin").is_file():
        state = _read_torch_bin([directory / "pytorch_model.bin"])
    elif (directory / "pytorch_model.bin.index.json").is_file():
        state = _read_torch_bin(_shards(directory, "pytorch_model.bin.index.json"))
    else:
        raise CheckpointError(f"no weights in {str(directory)!r}: expected model.safetensors, "
                              "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")
    return state, hf_config


def load_directory(path: os.PathLike | str, converter, **config_overrides) -> tuple[dict, ModelConfig]:
    """(params, config) from a transformers directory through a converter module (its
    `config_from_hf` and `params_from_hf_state_dict`)."""
    state, hf_config = read_hf_state_dict(path)
    config = converter.config_from_hf(hf_config, **config_overrides)
    return converter.params_from_hf_state_dict(state, config), config


def save_directory(params, config: ModelConfig, path: os.PathLike | str, converter, *, overwrite: bool = False,
                   dtype: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> pathlib.Path:
    """Writes params through a converter module (`params_to_hf_state_dict`, `config_to_hf`) as
    `config.json` + `model.safetensors` (or shards + index when larger than `max_shard_bytes`),
    in a temp directory renamed into place: nothing is left on failure."""
    from safetensors.numpy import save_file

    state = converter.params_to_hf_state_dict(params, config, dtype=dtype)
    hf_config = converter.config_to_hf(config, dtype=dtype or str(next(iter(state.values())).dtype))

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, x in state.items():
        if max_shard_bytes and shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = x
        size += x.nbytes
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2) + "\n")
        metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                weight_map.update({key: name for key in shard})
            index = {"metadata": {"total_size": sum(x.nbytes for x in state.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return pathlib.Path(path)
