"""The one training loop every stage runs: step, log, evaluate, checkpoint, resume, stop.

A stage supplies a pure loss function `loss_fn(model, batch) -> (loss_sum, weight_sum)` and
its data; the loop owns everything else. The jitted step is a pure function of arrays: the
model is split once (`nnx.split`) into a static graph and a parameter tree, and merged back
inside the step.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

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
from llmjax.errors import ConfigError, TrainingDivergedError
from llmjax.model.config import ModelConfig
from llmjax.model.transformer import build_model
from llmjax.parallel import mesh as mesh_lib
from llmjax.train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule

LossFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
# Stage-specific eval metrics (e.g. SFT exact match): (graphdef, params, step) -> metrics.
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
  seed: int = 0  # parameter init and the state's RNG
  peak_flops_per_device: float | None = None  # for MFU where the chip is not in the table
  loss_chunk_size: int = 0  # >0: memory-lean loss over this many positions at a time

  def __post_init__(self):
    for name in ("total_steps", "grad_accum_steps", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")


def init_params(model_cfg: ModelConfig, seed: int,
                shardings: Any = None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params), the params created by a compiled initializer on the device(s).

  With `shardings` they are created already sharded: no host ever holds the whole model.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, seed)))
  params = jax.jit(lambda: nnx.split(build_model(model_cfg, seed))[1],
                   out_shardings=shardings)()
  return graphdef, params


def init_train_state(params: nnx.State, tx: optax.GradientTransformation,
                     seed: int = 0) -> dict[str, Any]:
  """The state the train step carries: params, optimizer state, step, RNG, divergence mark."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed)),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: LossFn, grad_accum_steps: int):
  """`step(state, batch) -> (state, metrics)`; batch arrays are `[batch, seq]`.

  Gradients of microbatches are summed and divided by the total target count, so the update
  equals the full-batch update exactly. A step whose loss or gradient is not finite leaves
  the state untouched and records its number in `state['first_bad_step']`; so does a step
  whose update is not finite (an optimizer that diverged).
  """

  def grads_of(params, micro):
    def f(p):
      loss_sum, count = loss_fn(nnx.merge(graphdef, p), micro)
      return loss_sum, count
    (loss_sum, count), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss_sum, count, grads

  def step(state, batch):
    params = state["params"]
    # Microbatch a takes rows a, a+A, a+2A, ...: each device keeps its own rows, where a
    # contiguous split would move rows between devices of a batch-sharded mesh.
    micro = jax.tree.map(
        lambda x: x.reshape((-1, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, mb):
      loss_sum, count, grads = grads_of(params, mb)
      return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
          & (state["first_bad_step"] < 0))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "first_bad_step": jnp.where(ok | (state["first_bad_step"] >= 0),
                                    state["first_bad_step"], state["step"] + 1),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
               "target_tokens": count}
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
  def eval_step(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)
  return eval_step


class _StopRequest:
  """Turns SIGTERM (a preempted VM, `kill`) into 'checkpoint now and exit cleanly'."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling, nothing to restore
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
  graphdef: nnx.GraphDef
  params: nnx.State
  step: int
  finished: bool  # False when stopped early (stop_after, SIGTERM)


def train(*, stage: str, workdir: str, model_cfg: ModelConfig, loss_fn: LossFn,
          train_data: Any, eval_data: list[dict[str, np.ndarray]], train_cfg: TrainConfig,
          opt_cfg: OptimizerConfig, writer: metrics_lib.MetricsWriter,
          initial_params: nnx.State | None = None, meta: dict[str, Any] | None = None,
          stop_after: int | None = None, mesh: Mesh | None = None,
          rules: str | None = None, extra_eval: ExtraEval | None = None) -> TrainResult:
  """Trains `stage` to `train_cfg.total_steps`, resuming from its latest checkpoint.

  Args:
    train_data: a grain IterDataset of numpy batches `[batch, seq]`.
    eval_data: fixed held-out batches, evaluated every `eval_every` steps and at the end.
    initial_params: start from these (e.g. the previous stage's) instead of a random init,
      unless the stage already has a checkpoint to resume.
    stop_after: stop (after checkpointing) once this step is reached, as a preemption would.
    mesh, rules: the device mesh and the name of the logical-axis rule set
      (`llmjax.parallel.mesh.RULE_SETS`); default: data parallel over all devices.
    extra_eval: called at every evaluation; its metrics join the eval record.
  """
  mesh = mesh or mesh_lib.make_mesh(mesh_lib.MeshConfig())
  rules = mesh_lib.RULE_SETS[rules or "fsdp_tensor"]
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, train_cfg.seed)))
  p_shard = mesh_lib.param_shardings(abstract, mesh, rules)
  rep = mesh_lib.replicated(mesh)
  batch_shard = mesh_lib.batch_sharding(mesh, rules)
  if initial_params is None:
    params = init_params(model_cfg, train_cfg.seed, p_shard)[1]
  else:
    params = jax.jit(lambda p: p, out_shardings=p_shard)(initial_params)
  tx = build_optimizer(opt_cfg, train_cfg.total_steps)
  schedule = learning_rate_schedule(opt_cfg, train_cfg.total_steps)
  opt_shard = mesh_lib.like_params_shardings(jax.eval_shape(tx.init, params), params, p_shard,
                                             mesh)
  state_shard = {"params": p_shard, "opt_state": opt_shard, "step": rep, "rng": rep,
                 "first_bad_step": rep}
  state = jax.jit(lambda p: init_train_state(p, tx, train_cfg.seed),
                  out_shardings=state_shard)(params)

  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints/{stage}",
                                       every=train_cfg.checkpoint_every,
                                       keep=train_cfg.keep_checkpoints)
  data_iter = iter(train_data)
  meta = {"stage": stage, "model": dataclasses.asdict(model_cfg), **(meta or {})}
  latest = checkpointer.latest_step()
  if latest is not None:
    ckpt_lib.check_same_model(checkpointer.read_meta(latest)["model"], model_cfg,
                              checkpointer.directory)
    # Restores into this run's shardings, whatever mesh or process count wrote it.
    state = checkpointer.restore(latest, ckpt_lib.abstract_like(state), data_iter)
    logging.info("Resumed %s from step %d in %s", stage, latest, checkpointer.directory)

  def with_activation_sharding(fn):
    def wrapped(*args):
      with mesh_lib.activation_sharding(mesh, rules):
        return fn(*args)
    return wrapped

  step_fn = jax.jit(
      with_activation_sharding(
          make_train_step(graphdef, tx, schedule, loss_fn, train_cfg.grad_accum_steps)),
      in_shardings=(state_shard, batch_shard), out_shardings=(state_shard, rep),
      donate_argnums=0)
  eval_fn = jax.jit(with_activation_sharding(make_eval_step(graphdef, loss_fn)),
                    in_shardings=(p_shard, batch_shard), out_shardings=rep)
  to_device = lambda batch: mesh_lib.host_batch_to_global(batch, batch_shard)

  def evaluate(step: int) -> None:
    loss_sum = count = 0.0
    for batch in eval_data:
      s, c = eval_fn(state["params"], to_device(batch))
      loss_sum, count = loss_sum + float(s), count + float(c)
    loss = loss_sum / max(count, 1.0)
    record = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
    if extra_eval is not None:
      record.update(extra_eval(graphdef, state["params"], step))
    writer.write(step, record, kind="eval")

  def save(step: int) -> None:
    checkpointer.save(step, state, data_iter, {**meta, "step": step})

  seq_len = None
  flops_per_token = None
  peak = train_cfg.peak_flops_per_device or metrics_lib.peak_flops_per_device()
  step = first_step = int(state["step"])
  timer_start, timer_step = time.time(), step
  with _StopRequest() as stop:
    while step < train_cfg.total_steps:
      batch = next(data_iter)
      if batch["tokens"].shape[0] % train_cfg.grad_accum_steps:
        raise ConfigError(f"the batch of {batch['tokens'].shape[0]} rows is not divisible by "
                          f"TrainConfig.grad_accum_steps={train_cfg.grad_accum_steps}")
      if seq_len is None:
        seq_len = batch["tokens"].shape[1]
        flops_per_token = metrics_lib.flops_per_token(model_cfg, seq_len)
      tokens_per_step = batch["tokens"].size * jax.process_count()
      state, step_metrics = step_fn(state, to_device(batch))
      step += 1
      if step == first_step + 1:  # keep the first step's compile out of tokens/s
        jax.block_until_ready(state)
        timer_start = time.time()
      last = step == train_cfg.total_steps
      stopping = stop.requested or step == stop_after
      if step % train_cfg.log_every == 0 or last or stopping or checkpointer.should_save(step):
        bad = int(state["first_bad_step"])
        if bad >= 0:
          checkpointer.wait()
          good = checkpointer.latest_step()
          raise TrainingDivergedError(
              f"{stage}: the loss or gradient became NaN/Inf at step {bad}; the parameters "
              f"were not updated by it. The last good checkpoint is step {good} in "
              f"{checkpointer.directory}. Lower OptimizerConfig.learning_rate, check the data, "
              "or use float32 compute.")
      if step % train_cfg.log_every == 0 or last:
        m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        jax.block_until_ready(state)
        elapsed = time.time() - timer_start
        timed_steps = step - timer_step - (1 if timer_step == first_step else 0)
        if timed_steps > 0:
          tps = tokens_per_step * timed_steps / max(elapsed, 1e-9)
          m["tokens_per_sec"] = tps
          if peak:
            m["mfu"] = tps * flops_per_token / (peak * jax.device_count())
        writer.write(step, m)
        timer_start, timer_step = time.time(), step
      if step % train_cfg.eval_every == 0 or last:
        evaluate(step)
      if checkpointer.should_save(step) or last or stopping:
        save(step)
      if stopping and not last:
        break
  checkpointer.wait()
  checkpointer.close()
  return TrainResult(graphdef=graphdef, params=state["params"], step=step,
                     finished=step >= train_cfg.total_steps)
