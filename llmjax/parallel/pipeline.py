"""Pipeline parallelism: the decoder's layers split into stages over the `stage` mesh axis.

Parameters stay stored per layer (checkpoints and HF conversion do not change). Inside the
step the blocks' states are stacked to `[n_layers, ...]` and reshaped to
`[repeats, stages, layers_per_chunk, ...]`, the stage dimension sharded over `stage`; every
stage then holds the weights of its own layers. The batch is cut into microbatches that flow
through the stages in `repeats * microbatches + stages - 1` ticks of one `lax.scan`:

  tick t: stage s runs its layers on microbatch (t - s) mod m (repeat (t - s) // m), the
          stages side by side under `vmap(spmd_axis_name='stage')`; then each stage's output
          moves to the next stage (a roll over the stage-sharded dimension, which the SPMD
          partitioner compiles to a collective permute); the last stage's output is written
          back into the microbatch buffer, where stage 0 reads it again for the next repeat.

'gpipe' has one repeat: stage s holds layers [s * L/p, (s+1) * L/p). 'circular' (the
interleaved schedule of Megatron-LM and MaxText) cuts the layers into `stages * repeats`
chunks, chunk c on stage c mod p, and sends each microbatch round the stages `repeats` times:
the same bubble of p - 1 ticks is spread over `repeats` times as many (shorter) ticks, so the
idle fraction falls from (p-1)/(m+p-1) to (p-1)/(r*m+p-1), at the cost of `repeats` times as
many stage-to-stage transfers. Gradients come from reverse-mode autodiff through the scan:
all forward ticks, then all backward ticks (GPipe).

Bubble ticks compute on stale or zero activations whose outputs are never written, so they
add nothing to the result or the gradients, only time: the bubble.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.errors import ConfigError

SCHEDULES = ("gpipe", "circular")

# apply_layer(layer_state, layer_index, microbatch_index, x, positions, segment_ids) -> x:
# one block on one microbatch `x [mb, seq, d_model]`; the indices are traced scalars.
ApplyLayer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How the layers are pipelined over `stages` devices (the mesh's `stage` axis)."""
  stages: int
  microbatches: int
  schedule: str = "gpipe"
  repeats: int = 1  # 'circular': rounds each microbatch makes over the stages

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ConfigError(f"MeshConfig.pipeline_schedule={self.schedule!r} is unknown; choose "
                        f"one of {SCHEDULES}")
    if self.microbatches < 1:
      raise ConfigError(f"MeshConfig.num_microbatches must be at least 1, got "
                        f"{self.microbatches}")
    if self.schedule == "gpipe" and self.repeats != 1:
      raise ConfigError("MeshConfig.circular_repeats applies to pipeline_schedule='circular' "
                        f"only; 'gpipe' makes one round (got circular_repeats={self.repeats})")
    if self.repeats < 1:
      raise ConfigError(f"MeshConfig.circular_repeats must be at least 1, got {self.repeats}")
    if self.schedule == "circular" and self.microbatches < self.stages:
      raise ConfigError(
          f"MeshConfig.pipeline_schedule='circular' needs num_microbatches >= stage "
          f"({self.microbatches} < {self.stages}): a microbatch coming round again would find "
          "the first stage busy. Raise num_microbatches or use 'gpipe'.")

  @property
  def ticks(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """The expected idle fraction of every stage: (p - 1) / (r*m + p - 1)."""
    return bubble_fraction(self.stages, self.microbatches, self.repeats)

  def check_model(self, n_layers: int) -> None:
    """ConfigError unless the layers split evenly into the stages' chunks."""
    chunks = self.stages * self.repeats
    if n_layers % chunks:
      what = (f"stage={self.stages}" if self.repeats == 1 else
              f"stage * circular_repeats = {self.stages} * {self.repeats} = {chunks}")
      raise ConfigError(f"ModelConfig.n_layers={n_layers} does not split evenly over {what} "
                        "pipeline chunks: choose a stage count (and circular_repeats) whose "
                        "product divides the number of layers")

  def check_batch(self, rows: int) -> None:
    if rows % self.microbatches:
      raise ConfigError(f"a batch of {rows} rows (per TrainConfig.grad_accum_steps "
                        f"microbatch) does not split into MeshConfig.num_microbatches="
                        f"{self.microbatches} pipeline microbatches: make the rows a multiple")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """(p - 1) / (r*m + p - 1): the share of ticks a stage waits, GPipe's formula with `r`
  rounds of circular pipelining."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def run(stacked: nnx.State, apply_layer: ApplyLayer, x: jax.Array, positions: jax.Array,
        segment_ids: jax.Array | None, cfg: PipelineConfig, mesh, rules) -> jax.Array:
  """All layers on `x [batch, seq, d_model]`, pipelined over the `stage` mesh axis.

  `stacked` is the blocks' state with every leaf stacked to `[n_layers, ...]` (Variables
  keep their `logical_axes`, so each stage's weights stay split over data/fsdp/tensor as
  the rules say); `positions` and `segment_ids` are `[batch, seq]`.
  """
  from llmjax.parallel.mesh import logical_to_spec
  p, m, r = cfg.stages, cfg.microbatches, cfg.repeats
  n_layers = jax.tree.leaves(stacked)[0].shape[0]
  cfg.check_model(n_layers)
  cfg.check_batch(x.shape[0])
  per = n_layers // (p * r)
  rows = x.shape[0] // m

  def pin(a, spec):
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

  def rows_spec(a):  # a per-microbatch array `[mb, ...]` split like the residual stream
    return tuple(logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh, rules))

  def chunked(v):  # [n_layers, ...] -> [repeats, stages, per, ...], stages on `stage`
    if not isinstance(v, nnx.Variable):
      return v
    value = v.get_value()
    if len(jax.tree.leaves(value)) != 1:  # a structured (quantized) value: leave it be
      return v.replace(jax.tree.map(lambda a: a.reshape((r, p, per) + a.shape[1:]), value))
    axes = v.get_metadata().get("logical_axes")
    inner = logical_to_spec(axes, value.shape[1:], mesh, rules)
    value = value.reshape((r, p, per) + value.shape[1:])
    return v.replace(pin(value, P(None, "stage", None, *inner)))
  weights = jax.tree.map(chunked, stacked, is_leaf=lambda v: isinstance(v, nnx.Variable))
  layer_ids = jnp.arange(n_layers).reshape(r, p, per)

  # Microbatch j takes rows j, j+m, j+2m, ...: each device keeps its own rows.
  def micro(a):
    a = a.reshape((rows, m) + a.shape[1:]).swapaxes(0, 1)
    return pin(a, P(None, *rows_spec(a[0])))
  io = micro(x)  # the stage-0 inputs, overwritten with the last stage's outputs
  pos = micro(positions)
  seg = None if segment_ids is None else micro(segment_ids)

  def per_stage(a):  # [stages, mb, ...] on the stage axis
    return pin(a, P("stage", *rows_spec(a[0])))

  def stage_fn(w, ids, mb, h, pos_, seg_):
    """One stage: its `per` layers, in order, on one microbatch."""
    def body(h, layer):
      index, state = layer
      return apply_layer(state, index, mb, h, pos_, seg_), None
    return jax.lax.scan(body, h, (ids, w))[0]
  stages_fn = jax.vmap(stage_fn, spmd_axis_name="stage")
  stage = jnp.arange(p)

  def tick(carry, t):
    io, shift = carry
    k = t - stage  # [p] slots since each stage started
    mb = k % m
    rep = jnp.clip(k // m, 0, r - 1)
    inputs = per_stage(shift.at[0].set(io[t % m]))
    if r == 1:
      w = jax.tree.map(lambda a: a[0], weights)
      ids = layer_ids[0]
    else:  # each stage picks its chunk of this round: a local gather (the stage is its own)
      pick = jax.vmap(lambda a, i: a[i], in_axes=(1, 0), spmd_axis_name="stage")
      w = jax.tree.map(lambda a: pick(a, rep), weights)
      ids = layer_ids[rep, stage]
    out = per_stage(stages_fn(w, ids, mb, inputs, per_stage(pos[mb]),
                              None if seg is None else per_stage(seg[mb])))
    last = mb[p - 1]
    done = (k[p - 1] >= 0) & (k[p - 1] < r * m)
    io = io.at[last].set(jnp.where(done, out[p - 1], io[last]))
    return (io, per_stage(jnp.roll(out, 1, axis=0))), None

  shift = per_stage(jnp.zeros((p,) + io.shape[1:], io.dtype))
  (io, _), _ = jax.lax.scan(tick, (io, shift), jnp.arange(cfg.ticks))
  return io.swapaxes(0, 1).reshape(x.shape)
