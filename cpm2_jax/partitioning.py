"""Partition rules: logical axis names -> mesh axes, mesh builders, and sharded initialisation.

Every parameter and key activation carries logical axis names (`embed`, `mlp`, `heads`,
`kv`, `vocab`, `expert`, ...). One rules table maps them onto mesh axes (`data`, `model`,
`expert`); changing the parallelism is changing the mesh or the rules, never the model.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpm2_jax.errors import ShardingError
from cpm2_jax.param_paths import path_name

MESH_AXES = ("data", "model", "expert")

# The one rules table (t5x's standard 2-D rules plus the expert axis). Batch is split over
# `data` and, when the mesh has one, `expert` (every expert-parallel device also holds a
# slice of the batch). `embed` stays replicated so activations need no all-gather between
# layers; the wide axes (`mlp`, `heads`, `vocab`) are split over `model`.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("expert", "expert"),
    # MoE expert buffers [group, expert, slot, embed]: while experts are split over `expert`,
    # the groups stay split over `data` only (the all-to-all moves the `expert` share).
    ("expert_replicas", "data"),
    ("expert_group", None),
    ("unmodeled", None),
)


def rules_for_mesh(mesh_axis_names: Iterable[str], rules=LOGICAL_AXIS_RULES):
    """The rules with mesh axes that this mesh lacks removed (a 1-D data mesh, say)."""
    names = set(mesh_axis_names)
    out = []
    for logical, target in rules:
        if isinstance(target, (tuple, list)):
            kept = tuple(t for t in target if t in names)
            target = kept if len(kept) > 1 else (kept[0] if kept else None)
        elif target is not None and target not in names:
            target = None
        out.append((logical, target))
    return tuple(out)


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes that the `batch` logical axis is split over under `rules`."""
    rule = dict(rules).get("batch")
    return rule if isinstance(rule, tuple) else ((rule,) if rule else ())


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=8,model=8' -> {'data': 8, 'model': 8}; a bad spec names the offending part."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        if not eq or not size.strip().isdigit() or int(size) < 1:
            raise ShardingError(f"--mesh: {part!r} is not AXIS=SIZE with a positive integer size")
        name = name.strip()
        if name not in MESH_AXES:
            raise ShardingError(f"--mesh: unknown mesh axis {name!r}; mesh axes are {', '.join(MESH_AXES)}")
        if name in shape:
            raise ShardingError(f"--mesh: axis {name!r} given twice")
        shape[name] = int(size)
    if not shape:
        raise ShardingError("--mesh: empty mesh spec; expected e.g. data=8,model=8")
    return shape


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A named device mesh. On TPU/GPU the device order follows the physical topology
    (jax.make_mesh); on CPU (tests with fake devices) it is the device list in order."""
    names = tuple(shape)
    sizes = tuple(int(shape[n]) for n in names)
    devices = list(jax.devices()) if devices is None else list(devices)
    need = math.prod(sizes)
    if need != len(devices):
        if need > len(devices):
            raise ShardingError(f"mesh {dict(shape)} needs {need} devices, only {len(devices)} are available")
        devices = devices[:need]
    if devices[0].platform in ("tpu", "gpu", "cuda", "rocm") and len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, names)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names)


def cpu_test_mesh(data: int = 2, model: int = 4, expert: int = 0) -> Mesh:
    """A mesh over fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
    shape = {"data": data, "model": model}
    if expert:
        shape = {"data": data, "expert": expert} if model == 1 else {"data": data, "model": model, "expert": expert}
    return make_mesh(shape, jax.devices("cpu"))


def logical_specs(abstract_variables) -> Any:
    """The logical PartitionSpec of every leaf of a (boxed) variables tree."""
    return nn.get_partition_spec(abstract_variables)


def mesh_specs(logical, rules) -> Any:
    """Logical specs -> mesh PartitionSpecs under `rules`."""
    return nn.logical_to_mesh(logical, rules)


def check_divisible(shapes, specs, mesh_shape: Mapping[str, int], *, what: str = "parameter") -> None:
    """Raises ShardingError naming the parameter, its axis and the mesh axis that does not divide it."""
    def check(path, shape, spec):
        dims = getattr(shape, "shape", shape)
        for i, target in enumerate(tuple(spec) if spec is not None else ()):
            if target is None:
                continue
            targets = target if isinstance(target, tuple) else (target,)
            ways = math.prod(mesh_shape.get(t, 1) for t in targets)
            if dims[i] % ways:
                raise ShardingError(
                    f"{what} {path_name(path)} has shape {tuple(dims)}: its axis {i} (size {dims[i]}) cannot be "
                    f"split over mesh axis {'x'.join(targets)} of size {ways}; change --mesh or the model size")

    jax.tree_util.tree_map_with_path(check, shapes, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_for(abstract_variables, mesh: Mesh, rules=None):
    """NamedShardings for every leaf of a boxed abstract variables tree, divisibility checked."""
    rules = rules_for_mesh(mesh.axis_names) if rules is None else rules
    specs = mesh_specs(logical_specs(abstract_variables), rules)
    check_divisible(nn.unbox(abstract_variables), specs, dict(mesh.shape))
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def mesh_context(mesh: Mesh):
    """The context under which logical sharding constraints resolve against `mesh`
    (flax applies `nn.with_logical_constraint` only when a global mesh is set)."""
    return jax.set_mesh(mesh)


def init_sharded(module: nn.Module, rng: jax.Array, *init_args, mesh: Mesh, rules=None, **init_kwargs):
    """Initialises `module` with every parameter created directly in its final sharding
    (no full copy on one device first). Returns (unboxed variables, their shardings)."""
    rules = rules_for_mesh(mesh.axis_names) if rules is None else rules
    def init_fn(key):
        return module.init(key, *init_args, **init_kwargs)

    abstract = jax.eval_shape(init_fn, rng)  # shapes only: outside the mesh context
    shardings = shardings_for(abstract, mesh, rules)
    with mesh_context(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(rng)
    return variables, shardings


def optimizer_state_specs(state_shapes, param_shapes, param_specs):
    """Mesh specs for an optax state tree: moments shaped like a parameter take its spec;
    Adafactor's factored rows/columns drop the factored axis; everything else is replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, s, sp: by_path.__setitem__(path_name(p), (s.shape, sp)),
                                     param_shapes, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def spec_for(path, leaf):
        text = path_name(path)
        for ppath, (pshape, pspec) in by_path.items():
            if not (text.endswith("/" + ppath) or text == ppath or ("/" + ppath + "/") in text):
                continue
            pspec = tuple(pspec) + (None,) * (len(pshape) - len(tuple(pspec)))
            if tuple(leaf.shape) == tuple(pshape):
                return PartitionSpec(*pspec)
            if len(pshape) >= 2 and tuple(leaf.shape) == tuple(pshape[:-1]):
                return PartitionSpec(*pspec[:-1])
            if len(pshape) >= 2 and tuple(leaf.shape) == tuple(pshape[:-2]) + tuple(pshape[-1:]):
                return PartitionSpec(*(pspec[:-2] + pspec[-1:]))
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, state_shapes)


def build_mesh(mesh_shape: Optional[Mapping[str, int]] = None) -> Mesh:
    """The mesh a binary runs on: `mesh_shape` (e.g. {'data': 4, 'model': 2}), or one
    data-parallel axis over every device when None."""
    return make_mesh(dict(mesh_shape) if mesh_shape else {"data": jax.device_count()})


class ModelSharding:
    """Where one model's parameters and batches live on a mesh: the one place train, eval and
    infer take the mesh, the rules, the parameter shardings and the batch sharding from.

    Parameters follow the partition rules (`shardings_for`); batches are split over the mesh
    axes of the `batch` rule, so a global batch must be a multiple of `data_parallel_size`.
    """

    def __init__(self, model_config, mesh: Mesh, rules=None):
        from cpm2_jax.model import EncoderDecoder

        self.model_config = model_config
        self.mesh = mesh
        self.rules = rules_for_mesh(mesh.axis_names) if rules is None else rules
        self.model = EncoderDecoder(model_config)
        ones = jax.numpy.ones((1, 8), jax.numpy.int32)
        with self.mesh_and_rules():
            self.abstract_variables = jax.eval_shape(lambda key: self.model.init(key, ones, ones),
                                                     jax.random.PRNGKey(0))
        self.param_shardings = shardings_for(self.abstract_variables, mesh, self.rules)["params"]
        self.param_specs = mesh_specs(logical_specs(self.abstract_variables), self.rules)["params"]
        self.param_shapes = nn.unbox(self.abstract_variables)["params"]
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_axes = batch_axes(self.rules)
        self.data_parallel_size = math.prod(mesh.shape[a] for a in self.batch_axes)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(self.batch_axes or None))

    @classmethod
    def for_shape(cls, model_config, mesh_shape: Optional[Mapping[str, int]] = None, rules=None) -> "ModelSharding":
        return cls(model_config, build_mesh(mesh_shape), rules)

    def mesh_and_rules(self):
        """A context in which jitted code runs on this mesh under these partition rules."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def abstract_params(self):
        """ShapeDtypeStructs of the parameters carrying their target shardings (a restore target)."""
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      self.param_shapes, self.param_shardings)

    def check_batch_size(self, global_batch_size: int, ways_per_device: int = 1, what: str = "") -> None:
        """The global batch must split evenly over the data-parallel devices (x `ways_per_device`
        micro-batches); `what` names the setting at fault in the error."""
        ways = self.data_parallel_size * ways_per_device
        if global_batch_size % ways:
            axes = "x".join(self.batch_axes) or "none"
            extra = f" x grad_accum_steps {ways_per_device}" if ways_per_device > 1 else ""
            raise ShardingError(
                f"global batch size {global_batch_size}{what} is not divisible by the data-parallel size "
                f"{self.data_parallel_size} (mesh axes {axes} of mesh {dict(self.mesh.shape)}){extra}; "
                f"use a batch size that is a multiple of {ways}, or change the mesh")

    def place_params(self, params):
        return jax.device_put(params, self.param_shardings)

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of every array -> global arrays split over the batch axes
        (multi-host safe: each process gives its own rows)."""
        rows = next(iter(local_batch.values())).shape[0]
        self.check_batch_size(rows * jax.process_count())
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}
