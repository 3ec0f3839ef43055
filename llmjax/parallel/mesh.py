"""Device meshes and the one table that maps logical axis names to mesh axes.

The model names every parameter dimension (`embed`, `heads`, `mlp`, `vocab`, ...) and every
activation at block boundaries (`batch`, `seq`, `embed`). A rule set maps those names to the
mesh axes `data`, `fsdp`, `expert` and `tensor`; data parallelism, FSDP and tensor
parallelism are different rule sets over the same model code. `expert` splits a mixture of
experts' experts (the logical `expert` axis; llmjax/model/moe.py) and, like `data`, the batch
rows, so everything but the experts is data parallel over it. The axis `stage` is not in any
rule: the decoder's layers are pipelined over it (`llmjax.parallel.pipeline`); everything
outside the pipelined layers is replicated over it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Sequence

import gin
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.errors import ConfigError
from llmjax.parallel.pipeline import PipelineConfig

# stage outermost (the least traffic), tensor innermost (the most); expert next to it, as
# the experts' all-gather and reduce-scatter move every MoE layer's activations.
MESH_AXES = ("stage", "data", "fsdp", "expert", "tensor")
Rules = dict[str, Any]  # logical name -> mesh axis, tuple of mesh axes, or None

# `batch` always spans data x fsdp x expert: FSDP is data parallelism whose parameters are
# sharded too, and expert parallelism data parallelism whose experts are split.
_BATCH = ("data", "fsdp", "expert")
RULE_SETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated (experts split over `expert`), batch split.
    "data": {"batch": _BATCH, "expert": "expert"},
    # ZeRO-3 style: parameters (and so optimizer state) sharded along `embed` over `fsdp`.
    "fsdp": {"batch": _BATCH, "embed": "fsdp", "expert": "expert"},
    # Megatron style: heads, MLP hidden units and vocab split over `tensor`.
    "tensor": {"batch": _BATCH, "heads": "tensor", "kv_heads": "tensor",
               "mlp": "tensor", "vocab": "tensor", "expert": "expert"},
    # Both: the default; on a mesh where an axis has size 1 it reduces to the others.
    "fsdp_tensor": {"batch": _BATCH, "embed": "fsdp", "heads": "tensor",
                    "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                    "expert": "expert"},
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over all devices of all processes; -1 takes what the others leave.

  `stage > 1` pipelines the decoder's layers over that many stages (n_layers must divide),
  each batch (each grad-accumulation microbatch) cut into `num_microbatches` pipeline
  microbatches (None: one per stage) and run by `pipeline_schedule` ('gpipe', or
  'circular' with `circular_repeats` rounds over the stages). `expert > 1` splits a
  mixture of experts' experts over that many devices (n_experts must divide), which split
  the batch rows too.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: str = "fsdp_tensor"
  stage: int = 1
  num_microbatches: int | None = None
  pipeline_schedule: str = "gpipe"
  circular_repeats: int = 2  # 'circular' only
  expert: int = 1

  def __post_init__(self):
    if self.rules not in RULE_SETS:
      raise ConfigError(f"MeshConfig.rules={self.rules!r} is unknown; choose one of "
                        f"{sorted(RULE_SETS)}")
    for name in ("stage", "expert"):
      if getattr(self, name) < 1:
        raise ConfigError(f"MeshConfig.{name} must be at least 1, got {getattr(self, name)}")
    self.pipeline()  # a bad schedule, microbatch or repeat count fails here, before any compile

  def pipeline(self) -> PipelineConfig | None:
    """The pipeline settings, or None when `stage` is 1."""
    if self.stage == 1:
      return None
    circular = self.pipeline_schedule == "circular"
    return PipelineConfig(stages=self.stage,
                          microbatches=self.num_microbatches or self.stage,
                          schedule=self.pipeline_schedule,
                          repeats=self.circular_repeats if circular else 1)

  def shape(self, num_devices: int) -> tuple[int, int, int, int, int]:
    """(stage, data, fsdp, expert, tensor) sizes, the order of MESH_AXES."""
    dims = [self.data, self.fsdp, self.tensor]
    if dims.count(-1) > 1:
      raise ConfigError(f"MeshConfig {dims}: at most one axis may be -1")
    fixed = self.stage * self.expert
    known = math.prod(d for d in dims if d != -1) * fixed
    where = f"MeshConfig (data, fsdp, tensor) = {tuple(dims)}" + "".join(
        f" with {name}={getattr(self, name)}" for name in ("stage", "expert")
        if getattr(self, name) > 1)
    if any(d == 0 or d < -1 for d in dims) or num_devices % known:
      raise ConfigError(f"{where} does not fit {num_devices} devices")
    data, fsdp, tensor = [num_devices // known if d == -1 else d for d in dims]
    if data * fsdp * tensor * fixed != num_devices:
      raise ConfigError(f"{where} uses {data * fsdp * tensor * fixed} devices but there are "
                        f"{num_devices}; set one axis to -1")
    return (self.stage, data, fsdp, self.expert, tensor)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (stage, data, fsdp, expert, tensor) mesh over `devices` (default: every device of
  every process)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_and_rules(mesh: Mesh | None, rules: str | None) -> tuple[Mesh, Rules]:
  """The run's mesh and rule set; defaults: data parallel over every device, 'fsdp_tensor'."""
  if rules is not None and rules not in RULE_SETS:
    raise ConfigError(f"unknown logical-axis rule set {rules!r}; choose from {sorted(RULE_SETS)}")
  return mesh or make_mesh(MeshConfig()), RULE_SETS[rules or "fsdp_tensor"]


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
  """PartitionSpec for an array with these logical `axes`.

  A dimension the mesh axes do not divide is replicated instead (e.g. 2 KV heads on a
  tensor axis of 8), and a mesh axis is used at most once per array.
  """
  if axes is None:
    return P()
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = rules.get(name) if name else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
      logging.log_first_n(logging.WARNING, "dimension %s of size %d is not divisible by mesh "
                          "axes %s: replicating it", 10, name, size, mesh_axes)
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def param_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an nnx state whose Variables carry `logical_axes` metadata.

  On a mesh with a `stage` axis, each parameter is also split over `stage` (ZeRO-3 style,
  along its first dimension that divides), so pipelining divides the stored parameters and
  optimizer state by the stage count; the pipelined step moves each stage's layers to it.
  """
  from flax import nnx

  def one(v):
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    if len(jax.tree.leaves(value)) == 1:
      spec = _with_stage(logical_to_spec(axes, value.shape, mesh, rules), value.shape, mesh)
      return NamedSharding(mesh, spec)
    # A structured value (a quantized weight's codes and scales) names the axes of its 2-D
    # `[d_in, d_out]` view: 2-D leaves take both, 1-D leaves (per-column scales) the last.
    def leaf(x):
      leaf_axes = None if axes is None else tuple(axes[-x.ndim:]) if x.ndim <= len(axes) \
          else None
      return NamedSharding(mesh, logical_to_spec(leaf_axes, x.shape, mesh, rules))
    return v.replace(jax.tree.map(leaf, value))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _with_stage(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with the `stage` axis added to the first dimension it divides (after the axes
  already there); unchanged without a stage axis, or when no dimension divides."""
  stages = _stage_size(mesh)
  if stages == 1:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for i, (entry, size) in enumerate(zip(entries, shape)):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    if size % (math.prod(mesh.shape[a] for a in axes) * stages) == 0:
      entries[i] = "stage" if not axes else (*axes, "stage")
      return P(*entries)
  return spec


def sharded_abstract(abstract: Any, shardings: Any) -> Any:
  """`abstract` (ShapeDtypeStruct leaves) with `shardings` attached: a restore target."""
  leaves, treedef = jax.tree.flatten(abstract)
  return treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                            for a, s in zip(leaves, jax.tree.leaves(shardings))])


def like_params_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (optimizer state) whose leaves mirror `params` leaves.

  Optax keeps moments as trees shaped like the parameters, nested under its own state
  structure; a leaf whose key path ends with a parameter's key path (and has its shape)
  takes that parameter's sharding, everything else (counts, scalars) is replicated.
  """
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(shardings)):
    by_path[tuple(path)] = (p.shape, s)

  def one(path, leaf):
    for start in range(len(path)):
      hit = by_path.get(tuple(path[start:]))
      if hit and hit[0] == leaf.shape:
        return hit[1]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Rows of a `[batch, seq]` array split over the batch mesh axes."""
  return NamedSharding(mesh, P(_batch_axes(mesh, rules)))


def _batch_axes(mesh: Mesh, rules: Rules):
  target = rules.get("batch")
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  return axes if len(axes) != 1 else axes[0]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---- Activation sharding constraints -------------------------------------------------------
_active = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules, pipeline: PipelineConfig | None = None):
  """Within this context (while tracing), `constrain` pins activations to the mesh, and with
  `pipeline` (on a mesh whose `stage` axis has that many devices) the decoder pipelines its
  layers. Without it, layers run unpipelined: replicated over `stage`."""
  if pipeline is not None and _stage_size(mesh) != pipeline.stages:
    raise ConfigError(f"a pipeline of {pipeline.stages} stages needs a mesh whose 'stage' "
                      f"axis has {pipeline.stages} devices; this mesh has {dict(mesh.shape)}")
  previous = getattr(_active, "value", None), getattr(_active, "pipeline", None)
  _active.value, _active.pipeline = (mesh, rules), pipeline
  try:
    yield
  finally:
    _active.value, _active.pipeline = previous


def _stage_size(mesh: Mesh) -> int:
  return dict(mesh.shape).get("stage", 1)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
  active = getattr(_active, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def active_mesh() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the enclosing `activation_sharding`, if any."""
  return getattr(_active, "value", None)


def active_pipeline() -> PipelineConfig | None:
  """The pipeline of the enclosing `activation_sharding`, if it has one."""
  return getattr(_active, "pipeline", None)


def host_batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows -> global arrays whose rows are split over the batch axes."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)  # one call for the whole batch
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def global_to_host_rows(x: jax.Array, sharding: NamedSharding) -> np.ndarray:
  """The inverse of `host_batch_to_global` for one array split by `sharding`: this
  process's rows, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, sharding.mesh,
                                                                     sharding.spec))
