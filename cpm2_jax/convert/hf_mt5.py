"""Import from and export to transformers' `MT5ForConditionalGeneration` (CPM-2 is the mT5 layout).

One table (`tensor_map`) pairs every HF tensor with its place in the project's parameter tree
and the reshaping between them; both directions read it, so they cannot drift apart:
  torch Linear weights are [out, in]: q/k/v [heads*head_dim, d] -> kernel [d, heads, head_dim];
  o [d, heads*head_dim] -> kernel [heads, head_dim, d]; wi_*/wo/lm_head are transposed;
  relative_attention_bias [buckets, heads] -> rel_embedding [heads, buckets].
Files are read without unpickling: safetensors, or torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.convert.atomic import atomic_directory
from cpm2_jax.errors import CheckpointError, ConfigError

# HF keeps this unused tensor in some checkpoints and skips it on load; so do we.
_IGNORED_HF_KEYS = frozenset({"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"})
# Copies of `shared.weight` that older transformers versions write; CPM-2 has one input embedding.
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_SHARED = "shared.weight"
_MAX_LISTED_PROBLEMS = 6


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor: its key and shape, the project path (unscanned layout) and the reshaping kind.

    kind: "copy" (same shape), "transpose" (2-D), "heads_in" ([h*k, d] <-> [d, h, k]) or
    "heads_out" ([d, h*k] <-> [h, k, d]).
    """

    hf_key: str
    path: tuple[str, ...]
    kind: str
    hf_shape: tuple[int, ...]
    layer: Optional[int] = None  # the layer index for per-layer tensors (stacked when scanned)


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


def _attention(prefix: str, path: tuple[str, ...], c: ModelConfig, layer: int) -> list[HFTensor]:
    inner, d = c.num_heads * c.head_dim, c.d_model
    out = [HFTensor(f"{prefix}.{hf}.weight", path + (name, "kernel"), "heads_in", (inner, d), layer)
           for hf, name in (("q", "query"), ("k", "key"), ("v", "value"))]
    out.append(HFTensor(f"{prefix}.o.weight", path + ("out", "kernel"), "heads_out", (d, inner), layer))
    return out


def _feed_forward(prefix: str, path: tuple[str, ...], c: ModelConfig, layer: int) -> list[HFTensor]:
    return [HFTensor(f"{prefix}.DenseReluDense.wi_0.weight", path + ("mlp", "wi_0"), "transpose", (c.d_ff, c.d_model), layer),
            HFTensor(f"{prefix}.DenseReluDense.wi_1.weight", path + ("mlp", "wi_1"), "transpose", (c.d_ff, c.d_model), layer),
            HFTensor(f"{prefix}.DenseReluDense.wo.weight", path + ("mlp", "wo"), "transpose", (c.d_model, c.d_ff), layer),
            HFTensor(f"{prefix}.layer_norm.weight", path + ("pre_mlp_layer_norm", "scale"), "copy", (c.d_model,), layer)]


def tensor_map(config: ModelConfig) -> list[HFTensor]:
    """Every tensor of an MT5ForConditionalGeneration with `config`'s sizes, in HF state-dict order."""
    c = config
    d, buckets = c.d_model, c.relative_attention_num_buckets

    def norm(key, path, layer=None):
        return HFTensor(key, path, "copy", (d,), layer)

    out = [HFTensor(_SHARED, ("token_embedder", "embedding"), "copy", (c.vocab_size, d))]
    for i in range(c.num_encoder_layers):
        hf, path = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
        out += _attention(f"{hf}.0.SelfAttention", path + ("attention",), c, i)
        if i == 0:
            out.append(HFTensor(f"{hf}.0.SelfAttention.relative_attention_bias.weight",
                                ("encoder", "relpos_bias", "rel_embedding"), "transpose", (buckets, c.num_heads)))
        out.append(norm(f"{hf}.0.layer_norm.weight", path + ("pre_attention_layer_norm", "scale"), i))
        out += _feed_forward(f"{hf}.1", path, c, i)
    out.append(norm("encoder.final_layer_norm.weight", ("encoder", "encoder_norm", "scale")))
    for i in range(c.num_decoder_layers):
        hf, path = f"decoder.block.{i}.layer", ("decoder", f"layers_{i}")
        out += _attention(f"{hf}.0.SelfAttention", path + ("self_attention",), c, i)
        if i == 0:
            out.append(HFTensor(f"{hf}.0.SelfAttention.relative_attention_bias.weight",
                                ("decoder", "relpos_bias", "rel_embedding"), "transpose", (buckets, c.num_heads)))
        out.append(norm(f"{hf}.0.layer_norm.weight", path + ("pre_self_attention_layer_norm", "scale"), i))
        out += _attention(f"{hf}.1.EncDecAttention", path + ("encoder_decoder_attention",), c, i)
        out.append(norm(f"{hf}.1.layer_norm.weight", path + ("pre_cross_attention_layer_norm", "scale"), i))
        out += _feed_forward(f"{hf}.2", path, c, i)
    out.append(norm("decoder.final_layer_norm.weight", ("decoder", "decoder_norm", "scale")))
    out.append(HFTensor("lm_head.weight", ("decoder", "logits_dense", "kernel"), "transpose", (c.vocab_size, d)))
    return out


def _stored_path(t: HFTensor, scanned: bool) -> tuple[str, ...]:
    """Where the tensor lives in the tree: `layers_{i}` becomes `layers` (index i of axis 0) when scanned."""
    if scanned and t.layer is not None:
        return t.path[:1] + ("layers",) + t.path[2:]
    return t.path


def project_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter, in `config`'s layout (scanned layers stacked on axis 0)."""
    shapes = {}
    for t in tensor_map(config):
        shape = _project_shape(t, config)
        if config.scan_layers and t.layer is not None:
            n = config.num_encoder_layers if t.path[0] == "encoder" else config.num_decoder_layers
            shape = (n,) + shape
        shapes[_stored_path(t, config.scan_layers)] = shape
    return shapes


def _check_dense(config: ModelConfig) -> None:
    if config.is_moe:
        raise ConfigError("MT5ForConditionalGeneration is a dense model; convert with num_experts=0 "
                          "(dense-to-moe upcycling is a separate step)")


def _listed(problems: list[str]) -> str:
    more = len(problems) - _MAX_LISTED_PROBLEMS
    return "; ".join(problems[:_MAX_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(n) for n in x.shape)


def _to_numpy(x) -> np.ndarray:
    """A numpy array from numpy, jax or torch data (bfloat16 torch tensors via float32, exactly)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig) -> dict:
    """The project's params (nested dict of numpy arrays in `config.param_dtype`) from an HF state dict.

    Every missing, unexpected or wrong-shaped key is reported in one `CheckpointError` naming
    the key, the expected and the found shape.
    """
    import jax.numpy as jnp

    _check_dense(config)
    tensors = tensor_map(config)
    state = {k: v for k, v in state_dict.items() if k not in _IGNORED_HF_KEYS}
    problems = []
    for alias in _EMBEDDING_COPIES:
        if alias not in state:
            continue
        copy = state.pop(alias)
        if _SHARED not in state:
            state[_SHARED] = copy
        elif _shape(copy) != _shape(state[_SHARED]) or not np.array_equal(_to_numpy(copy), _to_numpy(state[_SHARED])):
            problems.append(f"key {alias!r} differs from {_SHARED!r}: CPM-2 has one input embedding shared by "
                            "encoder and decoder")
    expected = {t.hf_key: t for t in tensors}
    for key in state:
        if key not in expected:
            problems.append(f"unexpected key {key!r} (found shape {_shape(state[key])})")
    for t in tensors:
        if t.hf_key not in state:
            problems.append(f"missing key {t.hf_key!r} (expected shape {t.hf_shape})")
        elif _shape(state[t.hf_key]) != t.hf_shape:
            problems.append(f"key {t.hf_key!r}: expected shape {t.hf_shape}, found {_shape(state[t.hf_key])}")
    if problems:
        raise CheckpointError(f"HF checkpoint does not match the config ({_describe(config)}): {_listed(problems)}")

    dtype = jnp.dtype(config.param_dtype)
    flat: dict[tuple[str, ...], Any] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for t in tensors:
        x = np.asarray(_to_project(t, _to_numpy(state[t.hf_key]), config), dtype=dtype)
        path = _stored_path(t, config.scan_layers)
        if config.scan_layers and t.layer is not None:
            stacks.setdefault(path, {})[t.layer] = x
        else:
            flat[path] = np.ascontiguousarray(x)
    for path, layers in stacks.items():
        flat[path] = np.stack([layers[i] for i in range(len(layers))])
    return _nest(flat)


def _describe(c: ModelConfig) -> str:
    return (f"vocab {c.vocab_size}, d_model {c.d_model}, d_ff {c.d_ff}, {c.num_heads}x{c.head_dim} heads, "
            f"{c.num_encoder_layers}+{c.num_decoder_layers} layers")


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def flatten_params(params) -> dict[tuple[str, ...], Any]:
    """Path tuple -> leaf of a params tree (boxed or not, or a `{"params": ...}` variables dict)."""
    import flax.linen as nn
    import jax

    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def params_to_hf_state_dict(params, config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """HF state dict (contiguous numpy arrays, HF key order) from the project's params.

    `dtype` ("float32", "bfloat16", "float16") casts the output; default: the params' own dtype.
    A params tree that does not match `config` raises `CheckpointError` naming the path.
    """
    import jax
    import jax.numpy as jnp

    _check_dense(config)
    flat = flatten_params(params)
    stacks = {p[1] for p in flat if len(p) > 2 and p[1].startswith("layers")}
    if stacks and ("layers" in stacks) != config.scan_layers:
        have = "scanned (encoder/layers/...)" if "layers" in stacks else "unscanned (encoder/layers_0/...)"
        raise CheckpointError(f"params have {have} layers but the config says scan_layers={config.scan_layers}")
    expected = project_shapes(config)
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
        raise CheckpointError(f"params do not match the config ({_describe(config)}, {layout} layers): "
                              f"{_listed(problems)}")
    out_dtype = jnp.dtype(dtype) if dtype else None
    host = {path: np.asarray(jax.device_get(flat[path])) for path in expected}
    state = {}
    for t in tensor_map(config):
        x = host[_stored_path(t, config.scan_layers)]
        if config.scan_layers and t.layer is not None:
            x = x[t.layer]
        x = _to_hf(t, x)
        state[t.hf_key] = np.ascontiguousarray(x if out_dtype is None else x.astype(out_dtype))
    return state


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
    """ModelConfig from an MT5 (or gated-GELU, untied T5 v1.1) config dict or `PretrainedConfig`.

    `overrides` set project-only fields (scan_layers, param_dtype, dtype, remat_policy, ...).
    """
    hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    model_type = hf.get("model_type", "mt5")
    if model_type not in ("mt5", "t5"):
        raise ConfigError(f"HF config model_type {model_type!r} is not supported; expected 'mt5' "
                          "(or a gated-gelu 't5' v1.1)")
    if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ConfigError(f"HF config feed_forward_proj {hf['feed_forward_proj']!r} is not supported: "
                          "CPM-2 uses 'gated-gelu'")
    if model_type == "t5" and hf.get("tie_word_embeddings", True):
        raise ConfigError("HF T5 config with tie_word_embeddings=true rescales the output by d_model**-0.5; "
                          "only untied (v1.1 / mT5) models are supported")
    missing = [k for k in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers") if k not in hf]
    if missing:
        raise ConfigError(f"HF config lacks field(s) {', '.join(missing)}")
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_ff=int(hf["d_ff"]),
        num_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), num_encoder_layers=int(hf["num_layers"]),
        num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        dropout_rate=float(hf.get("dropout_rate", 0.0)),
    )
    fields.update(overrides)
    return ModelConfig().replace(**fields)


def config_to_hf(config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, Any]:
    """The `config.json` dict of an equivalent MT5ForConditionalGeneration (untied output head)."""
    _check_dense(config)
    c = config
    return {
        "architectures": ["MT5ForConditionalGeneration"],
        "model_type": "mt5",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.head_dim,
        "d_ff": c.d_ff,
        "num_layers": c.num_encoder_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": False,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": dtype or c.param_dtype,
    }


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


def read_hf_state_dict(path: os.PathLike | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, config.json dict) of a transformers directory: model.safetensors, sharded
    safetensors with an index, or pytorch_model.bin (only via torch.load(weights_only=True))."""
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"HF checkpoint directory {str(directory)!r} does not exist")
    config_file = directory / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in HF checkpoint directory {str(directory)!r}") from None
    except ValueError as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON: {err}") from None
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


def load_hf_checkpoint(path: os.PathLike | str, **config_overrides) -> tuple[dict, ModelConfig]:
    """(params, config) from a transformers MT5 directory; `config_overrides` as in `config_from_hf`."""
    state, hf_config = read_hf_state_dict(path)
    config = config_from_hf(hf_config, **config_overrides)
    return params_from_hf_state_dict(state, config), config


def save_hf_checkpoint(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False,
                       dtype: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> pathlib.Path:
    """Writes `config.json` + `model.safetensors` (or shards + index when larger than
    `max_shard_bytes`), loadable by `MT5ForConditionalGeneration.from_pretrained`.

    Written to a temp directory and renamed, so a failure leaves nothing behind; an existing
    non-empty `path` is replaced only with `overwrite=True`.
    """
    from safetensors.numpy import save_file

    state = params_to_hf_state_dict(params, config, dtype=dtype)
    out_dtype = dtype or str(next(iter(state.values())).dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, x in state.items():
        if max_shard_bytes and shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = x
        size += x.nbytes
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, dtype=out_dtype), indent=2) + "\n")
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
