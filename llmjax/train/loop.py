"""The one training loop every stage runs: step, log, evaluate, checkpoint, resume, stop.

A stage hands the loop its models by role (`roles.Role`: how to build each one, from which
arrays, and which variables train), a pure loss function over them and its data; the loop
owns everything else. The jitted step is a pure function of arrays: each model is split once
(`nnx.split`) into a static graph, its trainable state (in the donated train state, with
optimizer state) and its frozen state (a separate, non-donated argument), and merged back
inside the step. Only trainable state is checkpointed.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from llmjax import checkpoint as ckpt_lib
from llmjax import metrics as metrics_lib
from llmjax.errors import CheckpointError, ConfigError, TrainingDivergedError
from llmjax.model import lora, moe, router_losses
from llmjax.model.config import ModelConfig, check_dtype_on_backend
from llmjax.model.transformer import build_model
from llmjax.parallel import mesh as mesh_lib
from llmjax.parallel.pipeline import PipelineConfig
from llmjax.train import loss_scale as loss_scale_lib
from llmjax.train import roles as roles_lib
from llmjax.train.optimizer import (OptimizerConfig, build_optimizer, decay_mask,
                                    learning_rate_schedule)

# `loss_fn(model, roles, batch) -> (loss_sum, weight_sum, aux)`: `model` is the policy,
# `roles` maps every other role's name to its model, `aux` maps a metric name to a
# (sum, count) pair. Sums, not means: microbatches and hosts add up exactly.
LossOutput = tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]
LossFn = Callable[[nnx.Module, Mapping[str, Any], dict[str, jax.Array]], LossOutput]
# Stage-specific eval metrics (e.g. SFT exact match): (graphdef, params, step) -> metrics,
# with the policy's whole state (trainable and frozen parts).
ExtraEval = Callable[[nnx.GraphDef, nnx.State, int], dict[str, float]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long to train and how often to log, evaluate and checkpoint."""
  total_steps: int = 1000
  grad_accum_steps: int = 1  # the batch is split into this many sequential microbatches
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  # True: a checkpoint is written in the background while training goes on (no pause), so a
  # crash loses up to checkpoint_every steps plus those run while the newest save was still
  # being written. False: training waits for each save to be complete (a pause of one
  # save's time every checkpoint_every steps), so a crash loses at most checkpoint_every.
  async_checkpoints: bool = True
  seed: int = 0  # parameter init and the state's RNG
  peak_flops_per_device: float | None = None  # for MFU where the chip is not in the table
  # >0: the output layer and softmax of the loss (pretrain, SFT, distill, the DPO family,
  # GRPO, PPO) run over this many positions at a time, recomputed in the backward pass, so
  # the [rows, seq, vocab] float32 logits never exist at once (`losses.token_stats`).
  loss_chunk_size: int = 0
  # float16 loss scaling (train/loss_scale.py): None picks by ModelConfig.dtype ('dynamic' for
  # float16, 'none' otherwise); 'dynamic'; 'none'; or a number, a fixed scale. bfloat16 and
  # float32 need none. The dynamic scale starts at loss_scale_initial, grows by
  # loss_scale_factor after loss_scale_growth_interval finite steps, backs off by it on an
  # overflow (that step is skipped), and the run stops if it falls below loss_scale_min.
  loss_scale: str | float | None = None
  loss_scale_initial: float = 2.0 ** 15
  loss_scale_growth_interval: int = 2000
  loss_scale_factor: float = 2.0
  loss_scale_min: float = 1.0

  def __post_init__(self):
    for name in ("total_steps", "grad_accum_steps", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints", "loss_scale_growth_interval"):
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
    if self.loss_chunk_size < 0:
      raise ConfigError(f"TrainConfig.loss_chunk_size must be >= 0 (0: the whole logits at "
                        f"once), got {self.loss_chunk_size}")
    if self.loss_scale_factor <= 1:
      raise ConfigError(f"TrainConfig.loss_scale_factor must be > 1, got {self.loss_scale_factor}")
    if not 0 < self.loss_scale_min <= self.loss_scale_initial:
      raise ConfigError("TrainConfig.loss_scale_min must be positive and at most "
                        f"loss_scale_initial ({self.loss_scale_initial}), got "
                        f"{self.loss_scale_min}")

  def resolved_loss_scale(self, compute_dtype: str) -> loss_scale_lib.LossScale | None:
    """The loss scale for a model computing in `compute_dtype` (None: no scaling)."""
    return loss_scale_lib.from_settings(
        self.loss_scale, compute_dtype, initial=self.loss_scale_initial,
        growth_interval=self.loss_scale_growth_interval, factor=self.loss_scale_factor,
        min_scale=self.loss_scale_min)


def init_params(model_cfg: ModelConfig, seed: int,
                shardings: Any = None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params), the params created by a compiled initializer on the device(s).

  With `shardings` they are created already sharded: no host ever holds the whole model.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, seed)))
  params = jax.jit(lambda: nnx.split(build_model(model_cfg, seed))[1],
                   out_shardings=shardings)()
  return graphdef, params


def init_train_state(trainables: Mapping[str, nnx.State], tx: optax.GradientTransformation,
                     seed: int = 0,
                     loss_scale: loss_scale_lib.LossScale | None = None) -> dict[str, Any]:
  """The state the train step carries and checkpoints.

  `params` is the policy's trainable state (what a checkpoint's params item holds: all of a
  full fine-tune, the adapters of a LoRA run); `role_params` the other trainable roles'
  (e.g. `value`), present only when there are some; then the optimizer state over all of
  them, the step, the RNG (advanced every step) and the divergence mark; and with float16
  loss scaling, `loss_scale` (scale, good-step count, skipped steps), so a resume is exact.
  """
  others = {k: v for k, v in trainables.items() if k != roles_lib.POLICY}
  state = {"params": trainables[roles_lib.POLICY], "opt_state": tx.init(dict(trainables)),
           "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(seed)),
           "first_bad_step": jnp.full((), -1, jnp.int32)}
  if others:
    state["role_params"] = others
  if loss_scale is not None:
    state["loss_scale"] = loss_scale_lib.init(loss_scale)
  return state


def _trainables(state: dict[str, Any]) -> dict[str, nnx.State]:
  return {roles_lib.POLICY: state["params"], **state.get("role_params", {})}


def _models(graphdefs, trainables, frozen) -> dict[str, Any]:
  """Each role's model; those without trainable state behind `roles.Frozen`."""
  return {name: nnx.merge(gd, trainables[name], frozen[name]) if name in trainables
          else roles_lib.Frozen(nnx.merge(gd, frozen[name])) for name, gd in graphdefs.items()}


def _call_loss(loss_fn: LossFn, models: dict[str, nnx.Module], batch,
               train: bool = True) -> LossOutput:
  """`loss_fn` on the models, plus the router losses of the MoE forward passes it ran.

  Every stage's loss goes through here, so a mixture-of-experts policy trains with its
  load-balancing and z-losses whatever the stage: the trainable models' forward passes
  record their router statistics (`router_losses`; frozen roles do not), and with `train`
  `coef * router_loss * weight_sum` joins the loss sum, so that the loop's division by the
  weight leaves the coefficient times the router loss on top of the mean task loss. The
  router metrics join `aux` in training and evaluation alike; evaluation's loss stays the
  task loss alone.
  """
  others = {k: v for k, v in models.items() if k != roles_lib.POLICY}
  with router_losses.recording() as routed:
    out = loss_fn(models[roles_lib.POLICY], others, batch)
  if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)):
    raise TypeError("a loss function returns (loss_sum, weight_sum, aux) with aux a dict of "
                    f"name -> (sum, count); got {type(out).__name__}")
  for name, pair in out[2].items():
    if not (isinstance(pair, tuple) and len(pair) == 2):
      raise TypeError(f"aux metric {name!r} must be a (sum, count) pair of scalars")
  if not routed:
    return out
  loss_sum, weight, aux = out
  if train:
    loss_sum = loss_sum + router_losses.router_penalty(routed) * jax.lax.stop_gradient(weight)
  return loss_sum, weight, {**aux, **router_losses.router_metrics(routed)}


# What every step logs, NaN or not (a NaN loss is a divergence or, under float16 loss
# scaling, a skipped step: shown as it is).
_STEP_METRICS = ("loss", "grad_norm", "learning_rate", "target_tokens", "loss_scale",
                 "skipped_steps")


def _aux_means(aux: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
  return {name: jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), jnp.nan)
          for name, (s, c) in aux.items()}


def make_train_step(graphdefs: Mapping[str, nnx.GraphDef], tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: LossFn, grad_accum_steps: int,
                    loss_scale: loss_scale_lib.LossScale | None = None):
  """`step(state, frozen, batch) -> (state, metrics)`; batch arrays are `[batch, ...]`.

  `graphdefs` and `frozen` are keyed by role; `frozen[role]` is the role's non-trainable
  state (a LoRA base, a reference model), read but never updated. Gradients of microbatches
  are summed and divided by the total weight, so the update equals the full-batch update
  exactly; aux (sum, count) pairs add up the same way and are logged as sum / count. A step
  whose loss, gradient or update is not finite leaves the state untouched and records its
  number in `state['first_bad_step']`.

  With `loss_scale` (float16 compute; the state then has `loss_scale`, see
  `init_train_state`), each microbatch differentiates its mean loss times the scale and its
  gradients are unscaled in float32. A step whose loss or gradients are not finite is then
  an overflow, not a divergence: it is skipped (parameters and optimizer state untouched),
  counted, and the dynamic scale backs off; only a scale below its floor, or a non-finite
  update from finite gradients, marks `first_bad_step`.
  """

  def sums_of(trainables, frozen, micro, key, scale):
    def f(t):
      with lora.dropout_key(key):
        loss_sum, count, aux = _call_loss(loss_fn, _models(graphdefs, t, frozen), micro)
      if scale is None:
        return loss_sum, (loss_sum, count, aux)
      # The microbatch's mean loss, scaled: the scale then means what it does in jmp and
      # PyTorch whatever the batch size (a sum over many tokens would overflow float16).
      units = jax.lax.stop_gradient(jnp.maximum(count, 1.0))
      return loss_scale_lib.scale_loss(loss_sum / units, scale), (loss_sum, count, aux)
    (_, (loss_sum, count, aux)), grads = jax.value_and_grad(f, has_aux=True)(trainables)
    if scale is not None:  # back to gradients of the sum, in the master weights' float32
      grads = loss_scale_lib.unscale_grads(grads, scale, times=jnp.maximum(count, 1.0))
    return loss_sum, count, aux, grads

  def step(state, frozen, batch):
    trainables = _trainables(state)
    scale = state["loss_scale"] if loss_scale is not None else None
    # Microbatch a takes rows a, a+A, a+2A, ...: each device keeps its own rows, where a
    # contiguous split would move rows between devices of a batch-sharded mesh.
    micro = jax.tree.map(
        lambda x: x.reshape((-1, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    keys = jax.random.split(step_key, grad_accum_steps)

    def accumulate(carry, xs):
      mb, key = xs
      return jax.tree.map(jnp.add, carry, sums_of(trainables, frozen, mb, key, scale)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(sums_of, trainables, frozen, first, keys[0], scale)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32 if a.ndim == 0 else a.dtype),
                         shapes)
    (loss_sum, count, aux, grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainables)
    new_trainables = optax.apply_updates(trainables, updates)

    healthy = state["first_bad_step"] < 0
    grads_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok = grads_finite & jnp.isfinite(optax.tree.norm(updates)) & healthy
    newly_bad = ~ok & healthy
    if loss_scale is not None:
      new_scale = jax.tree.map(lambda a, b: jnp.where(healthy, a, b),
                               loss_scale_lib.update(scale, grads_finite, loss_scale), scale)
      # An overflow under a dynamic scale is skipped, not fatal, until the scale runs out.
      skipped = ~grads_finite if loss_scale.dynamic else jnp.asarray(False)
      newly_bad = healthy & ((~ok & ~skipped)
                             | loss_scale_lib.below_floor(new_scale, loss_scale))
    # Back to the incoming dtypes: the gradients are float32 (divided by the float32 count),
    # which would turn bf16 AdamW moments into float32 after the first step.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype),
                                         new, old)
    new_trainables = keep(new_trainables, trainables)
    new_state = {
        **state,
        "params": new_trainables[roles_lib.POLICY],
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": jax.random.key_data(next_key),
        "first_bad_step": jnp.where(newly_bad, state["step"] + 1, state["first_bad_step"]),
    }
    if "role_params" in state:
      new_state["role_params"] = {k: new_trainables[k] for k in state["role_params"]}
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
               "target_tokens": count, **_aux_means(aux)}
    if loss_scale is not None:
      new_state["loss_scale"] = new_scale
      # The scale the next step uses, and how many steps have been skipped so far.
      metrics["loss_scale"] = new_scale["scale"]
      metrics["skipped_steps"] = new_scale["skipped_steps"]
    return new_state, metrics

  return step


def make_eval_step(graphdefs: Mapping[str, nnx.GraphDef], loss_fn: LossFn):
  """`eval_step(trainables, frozen, batch) -> (loss_sum, weight_sum, aux)`, no dropout."""
  def eval_step(trainables, frozen, batch):
    return _call_loss(loss_fn, _models(graphdefs, trainables, frozen), batch, train=False)
  return eval_step


class _StopRequest:
  """Turns SIGTERM (a preempted VM, `kill`) and a first Ctrl-C into 'checkpoint now and exit
  cleanly'; a second Ctrl-C stops at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    except ValueError:  # not the main thread: no signal handling, nothing to restore
      self._previous = {}
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint and stopping (Ctrl-C again stops at "
                    "once, without saving).", signal.Signals(signum).name)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class TrainResult:
  graphdef: nnx.GraphDef  # the policy's
  params: nnx.State  # the policy's whole state: trainable and frozen parts
  step: int
  finished: bool  # False when stopped early (stop_after, SIGTERM)


@dataclasses.dataclass
class PolicyView:
  """What a `BatchSource` sees of the models when it makes the next batch."""
  graphdef: nnx.GraphDef
  params: nnx.State  # the policy's whole state, as in TrainResult
  step: int  # the step the batch is for (0-based)
  # The other roles by name: (graphdef, whole current state), e.g. PPO's value model (being
  # trained) and reward model (frozen), each placed on the mesh like the policy.
  roles: dict[str, tuple[nnx.GraphDef, nnx.State]] = dataclasses.field(default_factory=dict)


class BatchSource:
  """Batches that depend on the current parameters (RL rollouts), with checkpointed state.

  The loop calls `next_batch(view)` before every step. `get_state`/`set_state` (bytes of
  UTF-8 text, e.g. JSON or base64: grain's checkpoint handler stores them as a string) are
  saved with each checkpoint and restored on resume, as the grain iterator's position is,
  so a run whose batches are sampled from the policy resumes exactly like pretraining.
  Derive randomness from the state (e.g. `fold_in(key(seed), step)`), not from a global RNG.
  """

  def next_batch(self, view: PolicyView) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def get_state(self) -> bytes:
    raise NotImplementedError

  def set_state(self, state: bytes) -> None:
    raise NotImplementedError

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; nothing to prefetch here."""

  def metrics(self) -> dict[str, float]:
    """Host-side metrics of the batches made since the last call (e.g. rollout rewards and
    seconds), logged with the step's own."""
    return {}


def step_batch(batch: dict[str, Any], sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
  """This process's batch as the jitted train and eval steps take it: the global arrays
  (`mesh.host_batch_to_global`), or with one process the numpy arrays themselves, which the
  jitted call places by its in_shardings in its own C++ path (a device_put first costs a
  small RL step ~0.5 ms more host time before the step can start)."""
  if jax.process_count() == 1 and all(isinstance(v, np.ndarray) for v in batch.values()):
    return batch
  return mesh_lib.host_batch_to_global(batch, sharding)


def _leaves_of(shardings: Any, tree: Any) -> list[Any]:
  """The sharding of each of `tree`'s leaves, in its flattening order, from a tree of
  shardings with `tree`'s structure as far as it goes (one sharding may stand for a subtree:
  an nnx Variable, the loss scale's three counters)."""
  out: list[Any] = []
  jax.tree.map(lambda s, sub: out.extend([s] * len(jax.tree.leaves(sub))), shardings, tree)
  return out


@dataclasses.dataclass
class _PendingRecord:
  """A step's divergence mark and metrics, still device arrays, and its host-side metrics."""
  step: int
  bad: jax.Array  # the state's first_bad_step after this step
  metrics: dict[str, jax.Array] | None  # None: only checked, not logged
  host: dict[str, float]


def _raise_diverged(stage: str, bad: int, checkpointer: ckpt_lib.Checkpointer,
                    scaling: loss_scale_lib.LossScale | None, state: dict[str, Any]) -> None:
  """Raises TrainingDivergedError for a run whose step `bad` was not finite. `state` may be a
  later step's: after a bad step nothing in it changes (the loss scale included)."""
  checkpointer.wait()
  good = checkpointer.latest_step()
  if scaling is not None and float(state["loss_scale"]["scale"]) < scaling.min_scale:
    raise TrainingDivergedError(
        f"{stage}: float16 gradients overflowed at step {bad} with the loss scale "
        f"already at TrainConfig.loss_scale_min={scaling.min_scale:g} "
        f"({int(state['loss_scale']['skipped_steps'])} steps skipped in all): the "
        "model overflows float16 without any scaling. The parameters were not updated "
        f"by it; the last good checkpoint is step {good} in {checkpointer.directory}. "
        "Use ModelConfig.dtype='bfloat16' (float32's range) or 'float32'.")
  raise TrainingDivergedError(
      f"{stage}: the loss or gradient became NaN/Inf at step {bad}; the parameters "
      f"were not updated by it. The last good checkpoint is step {good} in "
      f"{checkpointer.directory}. Lower OptimizerConfig.learning_rate, check the data, "
      "or use float32 compute.")


def _log_pipeline(stage: str, pipeline: PipelineConfig, grad_accum_steps: int) -> None:
  """States the pipeline's expected bubble; warns when fewer microbatches than stages make
  it the larger part of every step."""
  text = (f"{stage}: {pipeline.schedule} pipeline over {pipeline.stages} stages, "
          f"{pipeline.microbatches} microbatches per grad-accumulation step "
          f"(x{grad_accum_steps})"
          + (f", {pipeline.repeats} rounds" if pipeline.repeats > 1 else "")
          + f": expected bubble {100 * pipeline.bubble:.1f}% of each step")
  if pipeline.microbatches < pipeline.stages:
    logging.warning("%s. MeshConfig.num_microbatches=%d is below stage=%d: raise it to at "
                    "least %d (bubble %.1f%%) or more", text, pipeline.microbatches,
                    pipeline.stages, pipeline.stages,
                    100 * pipeline.__class__(pipeline.stages, pipeline.stages).bubble)
  else:
    logging.info("%s", text)


def _place_role(role: roles_lib.Role, mesh: Mesh, rules: mesh_lib.Rules):
  """(graphdef, trainable state, frozen state, and their shardings) of one role, built by
  one jitted call straight into its shardings."""
  def split(init):
    _, trainable, frozen = nnx.split(role.build(init), role.trainable, ...)
    return trainable, frozen
  graphdef, abstract_t, abstract_f = nnx.split(
      nnx.eval_shape(lambda: role.build(role.init)), role.trainable, ...)
  shard_t = mesh_lib.param_shardings(abstract_t, mesh, rules)
  shard_f = mesh_lib.param_shardings(abstract_f, mesh, rules)
  trainable, frozen = jax.jit(split, out_shardings=(shard_t, shard_f))(role.init)
  return graphdef, trainable, frozen, shard_t, shard_f


def _restore_with_loss_scale(checkpointer: ckpt_lib.Checkpointer, step: int,
                             state: dict[str, Any], data_iter: Any, saved_scaled: bool,
                             rep: Any) -> dict[str, Any]:
  """The state at `step`, also when the compute dtype changed across the restart so that
  one side has a `loss_scale` entry and the other not (float16 <-> bfloat16): a run that
  starts scaling begins at its initial scale; one that stops drops the saved scale."""
  abstract = ckpt_lib.abstract_like(state)
  fresh = abstract.pop("loss_scale", None)
  if saved_scaled:
    abstract["loss_scale"] = fresh or ckpt_lib.abstract_like(
        jax.device_put(loss_scale_lib.init(loss_scale_lib.LossScale()), rep))
  # Restores into this run's shardings, whatever mesh or process count wrote it.
  restored = checkpointer.restore(step, abstract, data_iter)
  if fresh is None:
    restored.pop("loss_scale", None)
  elif not saved_scaled:
    logging.info("The checkpoint at step %d has no loss scale: float16 loss scaling starts "
                 "at its initial scale", step)
    restored["loss_scale"] = state["loss_scale"]
  return restored


def train(*, stage: str, workdir: str, policy: roles_lib.Role, loss_fn: LossFn,
          train_data: Any, eval_data: list[dict[str, np.ndarray]], train_cfg: TrainConfig,
          opt_cfg: OptimizerConfig, writer: metrics_lib.MetricsWriter,
          roles: Mapping[str, roles_lib.Role] | None = None,
          meta: dict[str, Any] | None = None, stop_after: int | None = None,
          mesh: Mesh | None = None, rules: str | None = None,
          pipeline: PipelineConfig | None = None,
          extra_eval: ExtraEval | None = None) -> TrainResult:
  """Trains `stage` to `train_cfg.total_steps`, resuming from its latest checkpoint.

  Args:
    policy: the model being trained (`roles.policy_role`): how to build it, from what, and
      which of its variables train.
    roles: other models the loss reads, by role name (`reference`, `reward`, `teacher`,
      or a trainable `value`); each is placed on the mesh by the same rules.
    train_data: this process's numpy batches `[batch, ...]`: an iterable whose iterator
      has get_state()/set_state() (a `data.global_order.GlobalOrder`, which resumes on any
      process count, or a grain IterDataset), or a `BatchSource` driven by the current
      parameters.
    eval_data: fixed held-out batches, evaluated every `eval_every` steps and at the end.
    stop_after: stop (after checkpointing) once this step is reached, as a preemption would.
    mesh, rules: the device mesh and the name of the logical-axis rule set
      (`llmjax.parallel.mesh.RULE_SETS`); default: data parallel over all devices.
    pipeline: pipeline the layers of every model the step runs over the mesh's `stage`
      axis (`MeshConfig.pipeline()`); None: no pipelining.
    extra_eval: called at every evaluation; its metrics join the eval record.
  """
  mesh, rules = mesh_lib.mesh_and_rules(mesh, rules)
  all_roles = {roles_lib.POLICY: policy, **(roles or {})}
  for role in all_roles.values():  # before anything compiles
    if role.config is not None:
      check_dtype_on_backend(role.config)
      moe.check_parallelism(role.config, dict(mesh.shape).get("expert", 1),
                            pipeline.stages if pipeline is not None else 1)
      if pipeline is not None:
        pipeline.check_model(role.config.n_layers)
  if pipeline is not None:
    _log_pipeline(stage, pipeline, train_cfg.grad_accum_steps)
    for batch in eval_data:  # evaluated whole, in one pipelined pass
      pipeline.check_batch(len(next(iter(batch.values()))) * jax.process_count())
  # One scale for every trainable role, chosen by the policy's compute dtype.
  scaling = train_cfg.resolved_loss_scale(policy.config.dtype if policy.config else "float32")
  graphdefs, trainables, frozen, t_shard, f_shard = {}, {}, {}, {}, {}
  for name, role in all_roles.items():
    graphdefs[name], t, frozen[name], ts, f_shard[name] = _place_role(role, mesh, rules)
    if jax.tree.leaves(t) or name == roles_lib.POLICY:
      trainables[name], t_shard[name] = t, ts
  if not jax.tree.leaves(trainables[roles_lib.POLICY]):
    raise ConfigError(f"{stage}: the policy has no trainable variables (its filter "
                      f"{policy.trainable!r} selects none)")
  model_cfg = policy.config
  rep = mesh_lib.replicated(mesh)
  batch_shard = mesh_lib.batch_sharding(mesh, rules)
  decay = decay_mask(trainables, opt_cfg)
  tx = build_optimizer(opt_cfg, train_cfg.total_steps, decay)
  schedule = learning_rate_schedule(opt_cfg, train_cfg.total_steps)
  opt_shard = mesh_lib.like_params_shardings(jax.eval_shape(tx.init, trainables), trainables,
                                             t_shard, mesh)
  state_shard = {"params": t_shard[roles_lib.POLICY], "opt_state": opt_shard, "step": rep,
                 "rng": rep, "first_bad_step": rep}
  if len(trainables) > 1:
    state_shard["role_params"] = {k: v for k, v in t_shard.items() if k != roles_lib.POLICY}
  if scaling is not None:
    state_shard["loss_scale"] = rep
  state = jax.jit(lambda t: init_train_state(t, tx, train_cfg.seed, scaling),
                  out_shardings=state_shard)(trainables)
  del trainables  # the state holds them now (and is donated to the step)

  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints/{stage}",
                                       every=train_cfg.checkpoint_every,
                                       keep=train_cfg.keep_checkpoints,
                                       async_save=train_cfg.async_checkpoints)
  param_driven = isinstance(train_data, BatchSource)
  data_iter = train_data if param_driven else iter(train_data)
  meta = {"stage": stage, "model": dataclasses.asdict(model_cfg),
          "loss_scale": dataclasses.asdict(scaling) if scaling else None, **(meta or {})}
  latest = checkpointer.latest_step()
  if latest is not None:
    saved = checkpointer.read_meta(latest)
    ckpt_lib.check_same_model(saved["model"], model_cfg, checkpointer.directory)
    if saved.get("base") != meta.get("base"):
      raise CheckpointError(
          f"{checkpointer.directory} holds adapters trained on {saved.get('base')}, but this "
          f"run now starts from {meta.get('base')}: use a new --workdir, or start from the "
          "same base")
    state = _restore_with_loss_scale(checkpointer, latest, state, data_iter,
                                     saved.get("loss_scale") is not None, rep)
    logging.info("Resumed %s from step %d in %s", stage, latest, checkpointer.directory)
  writer.resume_from(latest or 0)  # records past the restored step are redone, not repeated

  def with_activation_sharding(fn):
    def wrapped(*args):
      with mesh_lib.activation_sharding(mesh, rules, pipeline):
        return fn(*args)
    return wrapped

  train_step = make_train_step(graphdefs, tx, schedule, loss_fn, train_cfg.grad_accum_steps,
                               scaling)

  def step_and_mark(state, frozen, batch):
    # The divergence mark again, outside the state: the state is donated to the next step,
    # and the loop reads the mark (with the metrics) after that step is queued.
    new_state, metrics = train_step(state, frozen, batch)
    return new_state, metrics, new_state["first_bad_step"]

  # The step takes and returns the state's and the frozen roles' leaves as flat lists: jit
  # flattens nnx.State trees (and builds the new state's) in Python, ~0.5 ms per step for a
  # small model, which delays the step's start; a list is flattened in C++. The trees are
  # rebuilt on the host only when something reads them, while the device runs the step.
  state_def = jax.tree.structure(state)
  frozen_leaves, frozen_def = jax.tree.flatten(frozen)

  def flat_step(leaves, frozen_leaves, batch):
    new_state, metrics, mark = step_and_mark(jax.tree.unflatten(state_def, leaves),
                                             jax.tree.unflatten(frozen_def, frozen_leaves),
                                             batch)
    new_leaves, new_def = jax.tree.flatten(new_state)
    assert new_def == state_def, (new_def, state_def)
    return new_leaves, metrics, mark

  state_leaves, tree = jax.tree.leaves(state), state
  del state  # the leaves are donated to the step: read the state through current_state()

  def current_state() -> dict[str, Any]:
    nonlocal tree
    if tree is None:
      tree = jax.tree.unflatten(state_def, state_leaves)
    return tree

  step_fn = jax.jit(with_activation_sharding(flat_step),
                    in_shardings=(_leaves_of(state_shard, current_state()),
                                  _leaves_of(f_shard, frozen), batch_shard),
                    out_shardings=(_leaves_of(state_shard, current_state()), rep, rep),
                    donate_argnums=0)
  eval_fn = jax.jit(with_activation_sharding(make_eval_step(graphdefs, loss_fn)),
                    in_shardings=(t_shard, f_shard, batch_shard), out_shardings=rep)
  to_device = lambda batch: step_batch(batch, batch_shard)

  def policy_state() -> nnx.State:
    return nnx.merge_state(current_state()["params"], frozen[roles_lib.POLICY])

  def role_states() -> dict[str, tuple[nnx.GraphDef, nnx.State]]:
    current = _trainables(current_state())
    return {name: (gd, nnx.merge_state(current[name], frozen[name]) if name in current
                   else frozen[name])
            for name, gd in graphdefs.items() if name != roles_lib.POLICY}

  def evaluate(step: int) -> None:
    sums: dict[str, list[float]] = {}
    for batch in eval_data:
      loss_sum, count, aux = eval_fn(_trainables(current_state()), frozen, to_device(batch))
      for name, (s_, c_) in {"loss": (loss_sum, count), **aux}.items():
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + float(s_), acc[1] + float(c_)
    record = {name: s_ / c_ if c_ > 0 else float("nan") for name, (s_, c_) in sums.items()
              if c_ > 0 or name == "loss"}  # an aux metric with nothing to average: left out
    if "loss" in record and getattr(loss_fn, "is_token_nll", False):
      record["perplexity"] = float(np.exp(min(record["loss"], 50.0)))
    if extra_eval is not None:
      record.update(extra_eval(graphdefs[roles_lib.POLICY], policy_state(), step))
    writer.write(step, record, kind="eval")

  def save(step: int) -> None:
    checkpointer.save(step, current_state(), data_iter, {**meta, "step": step})

  seq_len = None
  flops_per_token = None
  peak = train_cfg.peak_flops_per_device or metrics_lib.peak_flops_per_device()
  step = first_step = int(current_state()["step"])
  timer_start, timer_step = time.time(), step
  # A logged step's record waits here, its metrics still on the device, until the next step
  # is queued: the host then fetches and writes them while the device runs that step, where
  # fetching at once would leave the device idle for the host's logging every logged step
  # (at log_every=1 on a small model, a good part of each step).
  pending: _PendingRecord | None = None

  def finish(record: _PendingRecord) -> None:
    """Stops the run if the record's step or an earlier one diverged; writes the record."""
    nonlocal timer_start, timer_step
    if int(record.bad) >= 0:
      _raise_diverged(stage, int(record.bad), checkpointer, scaling, current_state())
    if record.metrics is None:
      return
    # An aux metric with nothing to average this step (count 0, e.g. a gap measured only on
    # fresh rollouts) is NaN by `_aux_means`: left out of the record, not logged as NaN.
    m = {k: float(v) for k, v in jax.device_get(record.metrics).items()
         if k in _STEP_METRICS or not np.isnan(v)}
    if "skipped_steps" in m:
      m["skipped_steps"] = int(m["skipped_steps"])
    # The step's outputs are on the host, so it is done: the time to here is its time.
    elapsed = time.time() - timer_start
    timed_steps = record.step - timer_step - (1 if timer_step == first_step else 0)
    if timed_steps > 0 and tokens_per_step:
      tps = tokens_per_step * timed_steps / max(elapsed, 1e-9)
      m["tokens_per_sec"] = tps
      if peak:
        m["mfu"] = tps * flops_per_token / (peak * jax.device_count())
    m.update(record.host)
    writer.write(record.step, m)
    timer_start, timer_step = time.time(), record.step

  with _StopRequest() as stop:
    while step < train_cfg.total_steps:
      if param_driven:
        # Rollouts are computed like the step: activations split over the batch axes.
        with mesh_lib.activation_sharding(mesh, rules):
          batch = data_iter.next_batch(PolicyView(graphdefs[roles_lib.POLICY], policy_state(),
                                                  step, role_states()))
      else:
        batch = next(data_iter)
      rows = len(next(iter(batch.values())))
      if rows % train_cfg.grad_accum_steps:
        raise ConfigError(f"the batch of {rows} rows is not divisible by "
                          f"TrainConfig.grad_accum_steps={train_cfg.grad_accum_steps}")
      if pipeline is not None:
        pipeline.check_batch(rows * jax.process_count() // train_cfg.grad_accum_steps)
      if seq_len is None and "tokens" in batch:
        seq_len = batch["tokens"].shape[1]
        flops_per_token = metrics_lib.flops_per_token(model_cfg, seq_len)
      tokens_per_step = batch["tokens"].size * jax.process_count() if "tokens" in batch else 0
      if step == first_step:  # the first call compiles: minutes of silence on a large model
        logging.info("%s: compiling the train step...", stage)
        compile_start = time.time()
      state_leaves, step_metrics, bad = step_fn(state_leaves, frozen_leaves, to_device(batch))
      tree = None
      step += 1
      if pending is not None:  # the previous logged step's, while this one runs
        finish(pending)
        pending = None
      if step == first_step + 1:  # keep the first step's compile out of tokens/s
        jax.block_until_ready(state_leaves)
        logging.info("%s: train step compiled and run once in %.1f s", stage,
                     time.time() - compile_start)
        timer_start = time.time()
      last = step == train_cfg.total_steps
      stopping = stop.requested or step == stop_after
      logged = step % train_cfg.log_every == 0 or last
      # Before a checkpoint, an evaluation or the end, the step is checked (and its record
      # written) at once: nothing is saved or evaluated after a diverged step.
      now = (last or stopping or checkpointer.should_save(step)
             or step % train_cfg.eval_every == 0)
      if logged or now:
        host = {}
        if logged:
          if pipeline is not None:
            # Useful FLOPs only count toward mfu, so the bubble lowers it; this is the share
            # of each step the formula says the stages spend in it.
            host["pipeline_bubble"] = pipeline.bubble
          if param_driven:  # now: the next rollout's metrics are not this step's
            host.update(data_iter.metrics())
        record = _PendingRecord(step, bad, step_metrics if logged else None, host)
        if now:
          finish(record)
        else:
          pending = record
      if step % train_cfg.eval_every == 0 or last:
        evaluate(step)
      if checkpointer.should_save(step) or last or stopping:
        save(step)
      if stopping and not last:
        break
  checkpointer.wait()
  checkpointer.close()
  return TrainResult(graphdef=graphdefs[roles_lib.POLICY], params=policy_state(), step=step,
                     finished=step >= train_cfg.total_steps)
