"""Device meshes and the one table that maps logical axis names to mesh axes.

The model names every parameter dimension (`embed`, `heads`, `mlp`, `vocab`, ...) and every
activation at block boundaries (`batch`, `seq`, `embed`). A rule set maps those names to the
mesh axes `data`, `fsdp` and `tensor`; data parallelism, FSDP and tensor parallelism are
different rule sets over the same model code.
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

MESH_AXES = ("data", "fsdp", "tensor")
Rules = dict[str, Any]  # logical name -> mesh axis, tuple of mesh axes, or None

# `batch` always spans data x fsdp: FSDP is data parallelism whose parameters are sharded too.
RULE_SETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, batch split.
    "data": {"batch": ("data", "fsdp")},
    # ZeRO-3 style: parameters (and so optimizer state) sharded along `embed` over `fsdp`.
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp"},
    # Megatron style: heads, MLP hidden units and vocab split over `tensor`.
    "tensor": {"batch": ("data", "fsdp"), "heads": "tensor", "kv_heads": "tensor",
               "mlp": "tensor", "vocab": "tensor"},
    # Both: the default; on a mesh where an axis has size 1 it reduces to the others.
    "fsdp_tensor": {"batch": ("data", "fsdp"), "embed": "fsdp", "heads": "tensor",
                    "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over all devices of all processes; -1 takes what the others leave."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: str = "fsdp_tensor"

  def __post_init__(self):
    if self.rules not in RULE_SETS:
      raise ConfigError(f"MeshConfig.rules={self.rules!r} is unknown; choose one of "
                        f"{sorted(RULE_SETS)}")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    dims = [self.data, self.fsdp, self.tensor]
    if dims.count(-1) > 1:
      raise ConfigError(f"MeshConfig {dims}: at most one axis may be -1")
    known = math.prod(d for d in dims if d != -1)
    if any(d == 0 or d < -1 for d in dims) or num_devices % known:
      raise ConfigError(f"MeshConfig (data, fsdp, tensor) = {tuple(dims)} does not fit "
                        f"{num_devices} devices")
    dims = [num_devices // known if d == -1 else d for d in dims]
    if math.prod(dims) != num_devices:
      raise ConfigError(f"MeshConfig (data, fsdp, tensor) = {tuple(dims)} uses "
                        f"{math.prod(dims)} devices but there are {num_devices}; "
                        "set one axis to -1")
    return tuple(dims)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 3
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
  """NamedShardings for an nnx state whose Variables carry `logical_axes` metadata."""
  from flax import nnx

  def one(v):
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    if len(jax.tree.leaves(value)) == 1:
      return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))
    # A structured value (a quantized weight's codes and scales) names the axes of its 2-D
    # `[d_in, d_out]` view: 2-D leaves take both, 1-D leaves (per-column scales) the last.
    def leaf(x):
      leaf_axes = None if axes is None else tuple(axes[-x.ndim:]) if x.ndim <= len(axes) \
          else None
      return NamedSharding(mesh, logical_to_spec(leaf_axes, x.shape, mesh, rules))
    return v.replace(jax.tree.map(leaf, value))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
def activation_sharding(mesh: Mesh, rules: Rules):
  """Within this context (while tracing), `constrain` pins activations to the mesh."""
  previous = getattr(_active, "value", None)
  _active.value = (mesh, rules)
  try:
    yield
  finally:
    _active.value = previous


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
