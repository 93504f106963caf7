"""The original CPM-2 release's PyTorch checkpoints <-> the project's params.

The release (TsinghuaAI/CPM-2-Pretrain, Megatron + DeepSpeed) stores one file per
model-parallel rank, fp16, names from its `EncDecModel`:
    dense  ITER/mp_rank_{mp:02d}_model_states.pt          {"module": state dict, ...DeepSpeed fields}
    MoE    ITER/mp_rank_{dp:02d}_{mp:02d}_model_states.pt  {"iteration", "model": state dict}
           (data-parallel rank dp holds expert dp of every MoE layer: BASE layers, one expert a worker)
with `latest_checkpointed_iteration.txt` beside ITER. How a rank r of mp holds each matrix
(torch Linear weights are [out, in]; heads r*n..(r+1)*n, n = heads / mp):
    word_embeds / lm_head [V, d]       VocabParallelEmbedding: rows r*V/mp .. (r+1)*V/mp
    self_attn.project [3*h/mp, d]      ColumnParallelLinear, stride 3: [q_r; k_r; v_r]
    cross_attn.project_q [h/mp, d]     q_r;   project_kv [2*h/mp, d]: [k_r; v_r] (stride 2)
    *.dense [d, h/mp]                  RowParallelLinear: the columns of heads r
    relative_attention_bias [32, n]    the heads of rank r
    wi_0 / wi_1 [d_ff/mp, d]           ColumnParallelLinear;   wo [d, d_ff/mp]: RowParallelLinear
    layer norms, expert_centroids      replicated
Embedding rows follow `vocab.txt`'s lines; the project's vocabulary puts the sentinels last
(`WordPieceVocabulary.released_ids`: project id -> file line), so rows are permuted by it.

Import and export run rank by rank and tensor by tensor into one preallocated tree: the
largest extra memory is one shard (memory-mapped), never a second copy of the model.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError, ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
_DENSE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_MOE_FILE = re.compile(r"^mp_rank_(\d+)_(\d+)_model_states\.pt$")
# The released bilingual model pads its 51,967-line vocab.txt to 52,736 embedding rows (769);
# a vocabulary more rows than this short of the checkpoint is the wrong file.
MAX_PADDING_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class ReleaseTensor:
    """One tensor of the release: its key, how a rank holds it (`kind`), the project paths
    it fills (unscanned layout) and whether each data-parallel rank holds its own (expert).

    kinds: "replicated"; "vocab_rows" (embedding rows); "vocab_head" (output matrix rows);
    "heads_in" ([len(paths) * h/mp, d]: q/k/v of rank r stacked); "heads_out" ([d, h/mp]);
    "rel_bias" ([buckets, heads/mp]); "ff_in" ([d_ff/mp, d]); "ff_out" ([d, d_ff/mp]);
    "centroids" ([experts, d], replicated); "alias" (a copy of `word_embeds.weight`).
    """

    key: str
    kind: str
    paths: tuple[tuple[str, ...], ...]
    expert: bool = False


def check_release_config(config: ModelConfig) -> None:
    """The config must be one the release's EncDecModel can express."""
    c = config
    wrong = [f"{name}={getattr(c, name)!r} (release: {want})" for name, ok, want in (
        ("ffn_activation", c.ffn_activation == "gated_gelu", "'gated_gelu'"),
        ("tie_word_embeddings", not c.tie_word_embeddings, "False, a separate lm_head"),
        ("moe_expert_norm", not c.is_moe or c.moe_expert_norm, "True, each expert its own norm"),
        ("moe_encoder_sparse_step", not c.is_moe or c.moe_encoder_sparse_step == 1, "1, every layer MoE"),
        ("moe_decoder_sparse_step", not c.is_moe or c.moe_decoder_sparse_step == 1, "1, every layer MoE"),
        ("moe_router", not c.is_moe or c.moe_router == "balanced", "'balanced', BASE layers")) if not ok]
    if wrong:
        raise ConfigError("the config is not a CPM-2 release model: " + "; ".join(wrong))


def release_table(config: ModelConfig) -> list[ReleaseTensor]:
    """Every tensor of the release's state dict for `config`, in the release's module order."""
    check_release_config(config)
    out = [ReleaseTensor("word_embeds.weight", "vocab_rows", (("token_embedder", "embedding"),)),
           ReleaseTensor("lm_head.weight", "vocab_head", (("decoder", "logits_dense", "kernel"),))]
    for stack, layers in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        out.append(ReleaseTensor(f"{stack}.word_embeds.weight", "alias", ()))
        attention = "attention" if stack == "encoder" else "self_attention"
        for i in range(layers):
            block, path = f"{stack}.blocks.{i}", (stack, f"layers_{i}")
            self_attn = f"{block}.self_attn.self_attn"
            out.append(ReleaseTensor(f"{self_attn}.project.weight", "heads_in",
                                     tuple(path + (attention, m, "kernel") for m in ("query", "key", "value"))))
            if i == 0:
                out.append(ReleaseTensor(f"{self_attn}.relative_attention_bias.weight", "rel_bias",
                                         ((stack, "relpos_bias", "rel_embedding"),)))
            out += [ReleaseTensor(f"{self_attn}.dense.weight", "heads_out", (path + (attention, "out", "kernel"),)),
                    ReleaseTensor(f"{block}.self_attn.layer_norm.weight", "replicated",
                                  (path + (f"pre_{attention}_layer_norm", "scale"),))]
            if stack == "decoder":
                cross, xpath = f"{block}.cross_attn.cross_attn", path + ("encoder_decoder_attention",)
                out += [ReleaseTensor(f"{cross}.project_q.weight", "heads_in", (xpath + ("query", "kernel"),)),
                        ReleaseTensor(f"{cross}.project_kv.weight", "heads_in",
                                      (xpath + ("key", "kernel"), xpath + ("value", "kernel"))),
                        ReleaseTensor(f"{cross}.dense.weight", "heads_out", (xpath + ("out", "kernel"),)),
                        ReleaseTensor(f"{block}.cross_attn.layer_norm.weight", "replicated",
                                      (path + ("pre_cross_attention_layer_norm", "scale"),))]
            if config.is_moe:
                ff, experts = f"{block}.ff.expert_network", path + ("moe", "experts")
                out += [ReleaseTensor(f"{ff}.dense_relu_dense.wi_0.weight", "ff_in", (experts + ("wi_0",),), True),
                        ReleaseTensor(f"{ff}.dense_relu_dense.wi_1.weight", "ff_in", (experts + ("wi_1",),), True),
                        ReleaseTensor(f"{ff}.dense_relu_dense.wo.weight", "ff_out", (experts + ("wo",),), True),
                        ReleaseTensor(f"{ff}.layer_norm.weight", "replicated", (experts + ("norm_scale",),), True),
                        ReleaseTensor(f"{block}.ff.expert_centroids", "centroids",
                                      (path + ("moe", "router", "centroids"),))]
            else:
                ff = f"{block}.ff"
                out += [ReleaseTensor(f"{ff}.dense_relu_dense.wi_0.weight", "ff_in", (path + ("mlp", "wi_0"),)),
                        ReleaseTensor(f"{ff}.dense_relu_dense.wi_1.weight", "ff_in", (path + ("mlp", "wi_1"),)),
                        ReleaseTensor(f"{ff}.dense_relu_dense.wo.weight", "ff_out", (path + ("mlp", "wo"),)),
                        ReleaseTensor(f"{ff}.layer_norm.weight", "replicated",
                                      (path + ("pre_mlp_layer_norm", "scale"),))]
        out.append(ReleaseTensor(f"{stack}.final_layernorm.weight", "replicated", ((stack, f"{stack}_norm", "scale"),)))
    return out


def _per_rank(n: int, mp: int, what: str) -> int:
    if n % mp:
        raise ConfigError(f"{what} = {n} does not split over {mp} model-parallel ranks")
    return n // mp


def local_shape(t: ReleaseTensor, c: ModelConfig, mp: int) -> tuple[int, ...]:
    """The shape rank r of `mp` holds of tensor `t`."""
    heads = _per_rank(c.num_heads, mp, "num_heads")
    if t.kind in ("vocab_rows", "vocab_head", "alias"):
        return (_per_rank(c.vocab_size, mp, "vocab_size"), c.d_model)
    if t.kind == "heads_in":
        return (len(t.paths) * heads * c.head_dim, c.d_model)
    if t.kind == "heads_out":
        return (c.d_model, heads * c.head_dim)
    if t.kind == "rel_bias":
        return (c.relative_attention_num_buckets, heads)
    if t.kind == "ff_in":
        return (_per_rank(c.d_ff, mp, "d_ff"), c.d_model)
    if t.kind == "ff_out":
        return (c.d_model, _per_rank(c.d_ff, mp, "d_ff"))
    if t.kind == "centroids":
        return (c.num_experts, c.d_model)
    return (c.d_model,)  # replicated norms


# ---------------------------------------------------------------------------------------------
# One rank's tensor <-> the project's arrays
# ---------------------------------------------------------------------------------------------

def place(t: ReleaseTensor, local: np.ndarray, out: Mapping[tuple, np.ndarray], rank: int, mp: int,
          c: ModelConfig, where: np.ndarray, expert: tuple = ()) -> None:
    """Writes rank `rank`'s `local` tensor into the project arrays `out` (index `expert` first).
    `where[release_row]` is the project row of each embedding row."""
    n, k, d = c.num_heads // mp, c.head_dim, c.d_model
    heads = slice(rank * n, (rank + 1) * n)
    target = [out[p][expert] if expert else out[p] for p in t.paths]
    if t.kind == "replicated":
        target[0][...] = local
    elif t.kind in ("vocab_rows", "vocab_head"):
        rows = where[rank * local.shape[0]:(rank + 1) * local.shape[0]]
        if t.kind == "vocab_rows":
            target[0][rows] = local
        else:
            target[0][:, rows] = local.T
    elif t.kind == "heads_in":  # [m * n * k, d] -> m kernels [d, heads, k]
        parts = local.reshape(len(t.paths), n, k, d)
        for kernel, part in zip(target, parts):
            kernel[:, heads] = part.transpose(2, 0, 1)
    elif t.kind == "heads_out":  # [d, n * k] -> out kernel [heads, k, d]
        target[0][heads] = local.reshape(d, n, k).transpose(1, 2, 0)
    elif t.kind == "rel_bias":  # [buckets, n] -> [heads, buckets]
        target[0][heads] = local.T
    elif t.kind == "ff_in":  # [f, d] -> [d, d_ff] columns of rank r
        f = local.shape[0]
        target[0][:, rank * f:(rank + 1) * f] = local.T
    elif t.kind == "ff_out":  # [d, f] -> [d_ff, d] rows of rank r
        f = local.shape[1]
        target[0][rank * f:(rank + 1) * f] = local.T
    elif t.kind == "centroids":  # [E, d] -> [d, E]
        target[0][...] = local.T
    else:
        raise ValueError(f"unknown release tensor kind {t.kind!r}")


def take(t: ReleaseTensor, params: Mapping[tuple, np.ndarray], rank: int, mp: int, c: ModelConfig,
         where: np.ndarray, expert: tuple = ()) -> np.ndarray:
    """Rank `rank`'s tensor `t` from the project arrays (inverse of `place`); `where[release_row]`
    is the project row that release row holds. Returns a contiguous array."""
    n, k, d = c.num_heads // mp, c.head_dim, c.d_model
    heads = slice(rank * n, (rank + 1) * n)
    source = [params[p][expert] if expert else params[p] for p in t.paths]
    if t.kind == "replicated":
        x = source[0]
    elif t.kind in ("vocab_rows", "vocab_head", "alias"):
        size = c.vocab_size // mp
        rows = where[rank * size:(rank + 1) * size]
        x = source[0][rows] if t.kind != "vocab_head" else source[0][:, rows].T
    elif t.kind == "heads_in":
        x = np.concatenate([kernel[:, heads].transpose(1, 2, 0).reshape(n * k, d) for kernel in source])
    elif t.kind == "heads_out":
        x = source[0][heads].transpose(2, 0, 1).reshape(d, n * k)
    elif t.kind == "rel_bias":
        x = source[0][heads].T
    elif t.kind == "ff_in":
        f = c.d_ff // mp
        x = source[0][:, rank * f:(rank + 1) * f].T
    elif t.kind == "ff_out":
        f = c.d_ff // mp
        x = source[0][rank * f:(rank + 1) * f].T
    elif t.kind == "centroids":
        x = source[0].T
    else:
        raise ValueError(f"unknown release tensor kind {t.kind!r}")
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------------
# Vocabulary: the row permutation
# ---------------------------------------------------------------------------------------------

def vocab_lines(vocab_txt: os.PathLike | str) -> int:
    path = pathlib.Path(vocab_txt)
    try:
        return len(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read vocab.txt {str(path)!r}: {err}") from None


def row_order(vocab_txt: os.PathLike | str, rows: int) -> np.ndarray:
    """`order[project_row] = release_row`, a permutation of range(rows): the project's ids take
    the lines `released_ids` names; rows it leaves (padding, repeated lines, absent sentinels)
    keep their release order. Refuses a vocab.txt longer than `rows` or far shorter."""
    from cpm2_jax.tasks.vocabulary import WordPieceVocabulary

    lines = vocab_lines(vocab_txt)
    if lines > rows or rows - lines > MAX_PADDING_ROWS:
        raise ConfigError(f"vocab.txt {str(vocab_txt)!r} has {lines} lines but the checkpoint's embedding has "
                          f"{rows} rows: not this checkpoint's vocabulary (the release pads at most "
                          f"{MAX_PADDING_ROWS} rows past the file)")
    released = WordPieceVocabulary.from_vocab_txt(vocab_txt).released_ids
    order = np.full(rows, -1, np.int64)
    order[:len(released)] = released
    used = np.zeros(rows, bool)
    used[order[order >= 0]] = True
    free = iter(np.flatnonzero(~used))
    for i in np.flatnonzero(order < 0):
        order[i] = next(free)
    return order


def inverse(order: np.ndarray) -> np.ndarray:
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    return where


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing CPM-2 release checkpoints needs torch (pip install torch, or "
                              "the project's `test` extra)") from None
    return torch


def allowed_globals() -> list:
    """The only non-tensor types the release's pickles may hold beyond torch's weights_only
    defaults: the training arguments (argparse.Namespace), DeepSpeed's sets and numpy's RNG
    state. Anything else is refused unread."""
    import argparse

    import numpy.dtypes

    reconstruct = getattr(np, "_core", np).multiarray._reconstruct
    # numpy 1.x (the release's) pickles name it numpy.core.multiarray._reconstruct.
    return [argparse.Namespace, set, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, numpy.dtypes.UInt32DType]


def load_shard(path: pathlib.Path) -> Mapping[str, Any]:
    """The state dict of one release file: torch.load(weights_only=True) with `allowed_globals`,
    memory-mapped; a refused or unreadable pickle is a CheckpointError naming the file."""
    import pickle

    torch = _torch()
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
        except pickle.UnpicklingError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if "global" in ln.lower()] or [str(err)]
            raise CheckpointError(f"refused to unpickle {str(path)!r}: it holds an object outside the allow-list "
                                  f"({lines[0][:200]})") from None
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            raise CheckpointError(f"cannot read {str(path)!r}: {str(err).splitlines()[0][:200]}") from None
    state = obj.get("module", obj.get("model")) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{str(path)!r} holds no 'module' or 'model' state dict")
    return state


def _iteration_dir(path: pathlib.Path) -> pathlib.Path:
    """The directory of shard files: `path` itself, or the one its tracker file names."""
    if not path.is_dir():
        raise CheckpointError(f"CPM-2 checkpoint directory {str(path)!r} does not exist")
    tracker = path / TRACKER
    if tracker.is_file() and not any(path.glob("mp_rank_*_model_states.pt")):
        name = tracker.read_text().strip()
        if not (path / name).is_dir():
            raise CheckpointError(f"{str(tracker)!r} names iteration {name!r} but {str(path / name)!r} is missing")
        return path / name
    return path


def find_shards(path: os.PathLike | str) -> tuple[dict[tuple[int, int], pathlib.Path], int, int]:
    """{(dp, mp): file}, the model-parallel size and the number of experts (0: dense) of a
    release directory; a missing, duplicated or mixed-up rank is a CheckpointError."""
    directory = _iteration_dir(pathlib.Path(path).expanduser())
    found: dict[tuple[int, int], pathlib.Path] = {}
    kinds = set()
    for file in sorted(directory.glob("mp_rank_*_model_states.pt")):
        dense, moe = _DENSE_FILE.match(file.name), _MOE_FILE.match(file.name)
        if not (dense or moe):
            raise CheckpointError(f"unexpected shard name {file.name!r} in {str(directory)!r}")
        kinds.add("moe" if moe else "dense")
        rank = (int(moe.group(1)), int(moe.group(2))) if moe else (0, int(dense.group(1)))
        if rank in found:
            raise CheckpointError(f"duplicated rank {rank[1] if dense else rank} in {str(directory)!r}: "
                                  f"{found[rank].name!r} and {file.name!r}")
        found[rank] = file
    if not found:
        raise CheckpointError(f"no mp_rank_*_model_states.pt shards in {str(directory)!r}")
    if len(kinds) > 1:
        raise CheckpointError(f"{str(directory)!r} mixes dense (mp_rank_XX) and MoE (mp_rank_XX_YY) shards")
    dps = 1 + max(dp for dp, _ in found)
    mps = 1 + max(mp for _, mp in found)
    missing = [(dp, mp) for dp in range(dps) for mp in range(mps) if (dp, mp) not in found]
    if missing:
        names = [f"mp_rank_{dp:02d}_{mp:02d}" if "moe" in kinds else f"mp_rank_{mp:02d}" for dp, mp in missing]
        raise CheckpointError(f"missing rank(s) in {str(directory)!r}: {', '.join(names[:6])}_model_states.pt "
                              f"({len(found)} of {dps * mps} shards present)")
    return found, mps, dps if "moe" in kinds else 0


def infer_config(state: Mapping[str, Any], mp: int, experts: int, **overrides) -> ModelConfig:
    """The ModelConfig of a release from one shard's shapes (rank 0), the mp size and experts."""
    def shape(key):
        if key not in state:
            raise CheckpointError(f"release shard lacks key {key!r}")
        return tuple(int(n) for n in state[key].shape)

    vocab_local, d = shape("word_embeds.weight")
    buckets, heads_local = shape("encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight")
    inner_local = shape("encoder.blocks.0.self_attn.self_attn.dense.weight")[1]
    ff = "ff.expert_network" if experts else "ff"
    d_ff_local = shape(f"encoder.blocks.0.{ff}.dense_relu_dense.wi_0.weight")[0]
    layers = {s: len({k.split(".")[2] for k in state if k.startswith(f"{s}.blocks.")}) for s in ("encoder", "decoder")}
    fields = dict(vocab_size=vocab_local * mp, d_model=d, d_ff=d_ff_local * mp, num_heads=heads_local * mp,
                  head_dim=inner_local // heads_local, num_encoder_layers=layers["encoder"],
                  num_decoder_layers=layers["decoder"], relative_attention_num_buckets=buckets)
    if experts:
        fields.update(num_experts=experts, moe_router="balanced", moe_expert_norm=True)
    fields.update(overrides)
    return ModelConfig().replace(**fields)


def _shard_tensors(state: Mapping[str, Any], table: list[ReleaseTensor], c: ModelConfig, mp: int, file: pathlib.Path,
                   wanted: Callable[[ReleaseTensor], bool]) -> Iterator[tuple[ReleaseTensor, np.ndarray]]:
    """(entry, numpy view) of each wanted tensor of one shard, every key and shape checked first."""
    expected = {t.key: t for t in table}
    problems = [f"unexpected key {k!r}" for k in state if k not in expected]
    for t in table:
        if t.key not in state:
            problems.append(f"missing key {t.key!r}")
        elif tuple(state[t.key].shape) != local_shape(t, c, mp):
            problems.append(f"key {t.key!r}: expected shape {local_shape(t, c, mp)}, found {tuple(state[t.key].shape)}")
    if problems:
        raise CheckpointError(f"shard {str(file)!r} does not match the model ({c.num_encoder_layers}+"
                              f"{c.num_decoder_layers} layers, d_model {c.d_model}, mp {mp}): {'; '.join(problems[:6])}")
    for t in table:
        if t.kind == "alias":
            if not bool((state[t.key] == state["word_embeds.weight"]).all()):
                raise CheckpointError(f"shard {str(file)!r}: {t.key!r} differs from 'word_embeds.weight' "
                                      "(the release shares one embedding)")
        elif wanted(t):
            yield t, state[t.key].float().numpy() if str(state[t.key].dtype) == "torch.bfloat16" else state[t.key].numpy()


def read_release(path: os.PathLike | str, vocab_txt: os.PathLike | str, *, param_dtype: str = "float32",
                 progress: Optional[Callable[[str], None]] = None) -> tuple[dict, ModelConfig]:
    """(params as nested numpy arrays, unscanned, config) of a release directory + its vocab.txt.

    Shard by shard: each file is memory-mapped, its tensors copied into the preallocated
    project arrays, then released. Shared tensors are read from expert 0's files only.
    """
    from cpm2_jax.checkpoints.restore import abstract_params
    from cpm2_jax.convert.native import flatten_params, nest_params

    shards, mp, experts = find_shards(path)
    first = load_shard(shards[(0, 0)])
    config = infer_config(first, mp, experts, param_dtype=param_dtype)
    del first
    where = inverse(row_order(vocab_txt, config.vocab_size))
    table = release_table(config)
    dtype = np.dtype(param_dtype) if param_dtype != "bfloat16" else __import__("ml_dtypes").bfloat16
    out = {p: np.zeros(s.shape, dtype) for p, s in flatten_params(abstract_params(config)).items()}
    for (dp, rank), file in sorted(shards.items()):
        if progress:
            progress(f"reading {file.name}")
        state = load_shard(file)
        wanted = (lambda t: t.expert) if dp > 0 else (lambda t: True)
        for t, local in _shard_tensors(state, table, config, mp, file, wanted):
            place(t, local, out, rank, mp, config, where, (dp,) if t.expert else ())
        del state
    return nest_params(out), config


def write_release(params, config: ModelConfig, vocab_txt: os.PathLike | str, path: os.PathLike | str, *, mp: int,
                  iteration: int = 0, overwrite: bool = False,
                  progress: Optional[Callable[[str], None]] = None) -> pathlib.Path:
    """Writes params as the release's fp16 shards (dense: DeepSpeed files; MoE: one file per
    expert and rank), the tracker file and a copy of vocab.txt; all-or-nothing."""
    import shutil

    from cpm2_jax.convert.atomic import atomic_directory
    from cpm2_jax.convert.native import flatten_params

    torch = _torch()
    if mp <= 0:
        raise ConfigError(f"--mp must be positive, got {mp}")
    table = release_table(config)
    for name, n in (("num_heads", config.num_heads), ("d_ff", config.d_ff), ("vocab_size", config.vocab_size)):
        _per_rank(n, mp, name)
    flat = {p: np.asarray(v) for p, v in flatten_params(params).items()}
    where = inverse(row_order(vocab_txt, config.vocab_size))
    experts = max(config.num_experts, 1)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / TRACKER).write_text(f"{iteration}\n")
        (tmp / str(iteration)).mkdir()
        shutil.copyfile(vocab_txt, tmp / "vocab.txt")
        for dp in range(experts):
            for rank in range(mp):
                state: dict[str, Any] = {}
                for t in table:  # an alias is the same tensor, stored once (as torch.save shares storage)
                    state[t.key] = state["word_embeds.weight"] if t.kind == "alias" else torch.from_numpy(
                        take(t, flat, rank, mp, config, where, (dp,) if t.expert else ()).astype(np.float16))
                if config.is_moe:
                    name, record = f"mp_rank_{dp:02d}_{rank:02d}_model_states.pt", {"iteration": iteration,
                                                                                  "model": state}
                else:
                    name = f"mp_rank_{rank:02d}_model_states.pt"
                    record = {"module": state, "optimizer": None, "lr_scheduler": None,
                              "csr_tensor_module_names": set(), "skipped_steps": 0, "global_steps": iteration,
                              "global_samples": 0, "dp_world_size": 1, "mp_world_size": mp, "iteration": iteration}
                if progress:
                    progress(f"writing {name}")
                torch.save(record, str(tmp / str(iteration) / name))
                del state, record
    return pathlib.Path(path)
