"""The training loop: exact resume, gradient accumulation, NaN handling, safe checkpoints."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import checkpoint as ckpt_lib
from llmjax.data import pipeline
from llmjax.errors import CheckpointError, TrainingDivergedError
from llmjax.metrics import read_metrics
from llmjax.runs.load import load_run
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.pretrain import Pretrain
from llmjax.train import loop
from llmjax.train.losses import lm_loss, lm_objective
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL

DATA = pipeline.DataConfig(seq_len=32, batch_size=4, eval_batches=1)


def stage(tokenizer_path, total_steps=6, every=3, accum=1, async_checkpoints=True,
          **model_overrides):
  return Pretrain(
      model=dataclasses.replace(TEST_MODEL, **model_overrides), data=DATA,
      train=loop.TrainConfig(total_steps=total_steps, log_every=1, eval_every=total_steps,
                             checkpoint_every=every, grad_accum_steps=accum,
                             async_checkpoints=async_checkpoints),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      tokenizer=TokenizerConfig(path=tokenizer_path))


def run(workdir, s, stop_after=None):
  return run_stages([s], RunContext(workdir=str(workdir), stop_after=stop_after))


def params_of(ctx):
  return jax.tree.leaves(jax.device_get(ctx.outputs["pretrain"].params))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_path):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, params_of(run(workdir, stage(tokenizer_path)))


def test_resume_after_interruption_is_exact(straight_run, tmp_path, tokenizer_path,
                                            monkeypatch):
  _, expected = straight_run
  committed_on_return = []
  save = ckpt_lib.Checkpointer.save

  def checked_save(self, step, *args):
    save(self, step, *args)
    committed_on_return.append(os.path.isdir(os.path.join(self.directory, str(step))))

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", checked_save)
  # The first part saves synchronously: each save is committed before training goes on (a
  # crash loses at most checkpoint_every steps), and the numbers are the async run's.
  first = run(tmp_path, stage(tokenizer_path, async_checkpoints=False), stop_after=3)
  assert committed_on_return == [True]
  assert first.outputs["pretrain"].params is not None
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints/pretrain"), 1).latest_step() == 3
  resumed = params_of(run(tmp_path, stage(tokenizer_path)))  # as a fresh process would
  assert len(resumed) == len(expected)
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)  # bit-for-bit: params, optimizer, RNG and data
  steps = [m["step"] for m in read_metrics(str(tmp_path)) if m["kind"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]


def _tensorboard_scalars(logdir):
  """(tag, step) -> values, as TensorBoard shows them: a SessionLog START at step s (a
  writer's purge_step) hides the events at steps >= s that came before it."""
  import struct
  from tensorboardX.proto import event_pb2
  seen: dict = {}
  for name in sorted(os.listdir(logdir)):  # event files are named by creation time
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        seen = {k: v for k, v in seen.items() if k[1] < event.step}
      for value in event.summary.value:
        seen.setdefault((value.tag, event.step), []).append(value.simple_value)
  return seen


def test_resume_redoes_steps_without_repeating_their_metrics(tmp_path, tokenizer_path):
  s = stage(tokenizer_path)  # checkpoints at 3 and 6
  run(tmp_path, s, stop_after=5)
  # As if the process was killed after logging step 5 but before saving it: resuming
  # from 3 redoes steps 4 and 5.
  import shutil
  shutil.rmtree(tmp_path / "checkpoints/pretrain/5")
  run(tmp_path, s)
  rows = read_metrics(str(tmp_path))
  keys = [(r["stage"], r["kind"], r["step"]) for r in rows]
  assert len(keys) == len(set(keys)), keys
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if r["kind"] == "baseline"] == [0]
  scalars = _tensorboard_scalars(tmp_path / "tensorboard" / "pretrain")
  assert all(len(v) == 1 for v in scalars.values())
  assert sorted(step for tag, step in scalars if tag == "train/loss") == [1, 2, 3, 4, 5, 6]


def test_console_shows_a_records_counts(tmp_path, capsys):
  writer = loop.metrics_lib.MetricsWriter(str(tmp_path), "sft", 10)
  writer.write(0, {"train_examples": 1200, "skipped_lines": 0}, kind="data")
  writer.write(0, {}, kind="baseline")  # nothing to show: no line at all
  writer.close()
  assert capsys.readouterr().err.splitlines() == [
      "[sft] data @ step 0: train_examples 1200 skipped_lines 0"]


def test_metrics_are_logged(straight_run):
  workdir, _ = straight_run
  records = read_metrics(str(workdir))
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all({"stage", "loss", "grad_norm", "learning_rate", "tokens_per_sec"} <= r.keys()
             for r in train[1:])
  assert evals and evals[-1]["step"] == 6 and np.isfinite(evals[-1]["perplexity"])
  assert os.listdir(os.path.join(workdir, "tensorboard", "pretrain"))


def test_gradient_accumulation_equals_full_batch(tokenizer):
  import optax
  graphdef, params = loop.init_params(TEST_MODEL, seed=0)
  # Plain SGD with lr 1 makes the update the gradient itself (Adam's first step would be
  # ~sign(grad), which amplifies float noise in near-zero gradients).
  tx, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
  batch = next(iter(pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])))
  # Make the microbatches unequal in target count, where averaging the means would be wrong.
  batch["loss_mask"][:2, 20:] = 0
  out = []
  for accum in (1, 2, 4):
    state = loop.init_train_state({"policy": params}, tx)
    step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, sched, lm_objective(), accum))
    new_state, metrics = step(state, {"policy": nnx.State({})}, batch)
    out.append((float(metrics["loss"]), jax.tree.leaves(new_state["params"])))
  for loss, leaves in out[1:]:
    assert loss == pytest.approx(out[0][0], rel=1e-6)
    for a, b in zip(leaves, out[0][1]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tokenizer_path,
                                                                   monkeypatch):
  import optax
  real_build = loop.build_optimizer

  def nan_from_fifth_update(cfg, total_steps, mask=None):
    # An optimizer that blows up on its 5th update, as a too-high learning rate would.
    def update(updates, count, params=None):
      scale = jnp.where(count >= 4, jnp.nan, 1.0)
      return jax.tree.map(lambda u: u * scale, updates), count + 1
    poison = optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)
    return optax.chain(real_build(cfg, total_steps, mask), poison)

  monkeypatch.setattr(loop, "build_optimizer", nan_from_fifth_update)
  with pytest.raises(TrainingDivergedError, match="at step 5.*last good checkpoint is step 3"):
    run(tmp_path, stage(tokenizer_path, total_steps=8, every=3))
  loaded = load_run(str(tmp_path))
  assert loaded.step == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(loaded.params)))


def test_non_finite_loss_leaves_state_untouched(tokenizer):
  graphdef, params = loop.init_params(TEST_MODEL, seed=0)
  cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
  from llmjax.train.optimizer import build_optimizer, learning_rate_schedule
  tx = build_optimizer(cfg, 10)
  nan_loss = lambda model, roles, batch: (jnp.float32(jnp.nan) * lm_loss(model, batch)[0],
                                          jnp.float32(1.0), {})
  step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, learning_rate_schedule(cfg, 10),
                                      nan_loss, 1))
  state = {**loop.init_train_state({"policy": params}, tx), "step": jnp.int32(7)}
  batch = next(iter(pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])))
  new_state, _ = step(state, {"policy": nnx.State({})}, batch)
  assert int(new_state["first_bad_step"]) == 8
  for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_interrupted_save_is_never_restored(straight_run, tmp_path):
  import shutil
  workdir, _ = straight_run
  ckdir = tmp_path / "checkpoints" / "pretrain"
  shutil.copytree(workdir / "checkpoints" / "pretrain", ckdir)
  # What a crash mid-save leaves: Orbax's temporary directory for step 9, half written.
  partial = ckdir / "9.orbax-checkpoint-tmp-1234567"
  shutil.copytree(ckdir / "6", partial)
  (partial / "params" / "manifest.ocdbt").write_bytes(b"truncated")
  assert ckpt_lib.Checkpointer(str(ckdir), 1).latest_step() == 6
  shutil.copy(workdir / "tokenizer.model", tmp_path / "tokenizer.model")
  assert load_run(str(tmp_path), "pretrain").step == 6


def test_resuming_with_a_different_model_shape_is_refused(straight_run, tokenizer_path):
  workdir, _ = straight_run
  bigger = stage(tokenizer_path, total_steps=8, d_model=96)
  with pytest.raises(CheckpointError, match="different model.*d_model: checkpoint 64 vs config 96"):
    run(workdir, bigger)


def test_missing_step_lists_the_saved_ones(straight_run):
  workdir, _ = straight_run
  with pytest.raises(CheckpointError, match=r"no checkpoint step 99 .*saved steps: \[3, 6\]"):
    load_run(str(workdir), "pretrain", step=99)


def test_bf16_train_step_keeps_fp32_params_and_is_close_to_fp32(tokenizer):
  import optax
  batch = next(iter(pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])))
  # SGD with lr 1: the update is minus the gradient, so it compares directly (Adam's first
  # step, ~lr * sign(grad), would blow rounding noise in tiny gradients up to full size).
  tx, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
  out = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, params = loop.init_params(dataclasses.replace(TEST_MODEL, dtype=dtype), seed=0)
    state = loop.init_train_state({"policy": params}, tx)
    new_state, metrics = jax.jit(loop.make_train_step({"policy": graphdef}, tx, sched,
                                                      lm_objective(), 1))(
        state, {"policy": nnx.State({})}, batch)
    new, old = jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)
    out[dtype] = (float(metrics["loss"]), [np.asarray(a - b) for a, b in zip(new, old)], new)
  (loss32, update32, _), (loss16, update16, params16) = out["float32"], out["bfloat16"]
  assert np.isfinite(loss16)
  assert all(p.dtype == jnp.float32 for p in params16)  # param_dtype, whatever the compute
  assert loss16 == pytest.approx(loss32, rel=1e-3) and loss16 != loss32  # measured 7e-6
  # Measured: the bf16 update is 0.6% (relative L2) off the fp32 one, each tensor under 1%,
  # the rounding of a bf16 forward and backward (8-bit mantissa); with the compute dtype
  # ignored the two runs are one program and the difference is exactly 0.
  err = (np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(update16, update32)))
         / np.sqrt(sum(np.sum(b ** 2) for b in update32)))
  assert 1e-4 < err < 0.05, err
  for a, b in zip(update16, update32):  # and no tensor is far off on its own
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)


def test_bf16_parameters_keep_their_dtypes_through_a_step(tokenizer):
  """The state leaves keep their dtypes (bf16 params and AdamW moments stay bf16), so the
  donated state is reused and the step compiles once."""
  from llmjax.train.optimizer import build_optimizer
  cfg = dataclasses.replace(TEST_MODEL, dtype="bfloat16", param_dtype="bfloat16")
  graphdef, params = loop.init_params(cfg, seed=0)
  tx = build_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0), 10)
  state = loop.init_train_state({"policy": params}, tx)
  batch = next(iter(pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])))
  step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, optax.constant_schedule(1e-3),
                                      lm_objective(), 1))
  new_state, _ = step(state, {"policy": nnx.State({})}, batch)
  dtypes = lambda t: [x.dtype for x in jax.tree.leaves(t)]
  assert jnp.bfloat16 in dtypes(state["opt_state"])
  assert dtypes(new_state) == dtypes(state)


def test_reading_a_wrong_stage_lists_the_stages_and_writes_nothing(straight_run):
  workdir, _ = straight_run

  def snapshot():
    return sorted((os.path.relpath(os.path.join(r, f), workdir),
                   os.stat(os.path.join(r, f)).st_mtime_ns)
                  for r, ds, fs in os.walk(workdir) for f in fs + ds)
  before = snapshot()
  with pytest.raises(CheckpointError, match=r"no checkpoint of stage 'sft'; its stages: "
                                            r"\['pretrain'\]"):
    load_run(str(workdir), "sft")
  assert snapshot() == before
  assert load_run(str(workdir)).stage == "pretrain"  # the run's own record, not a dir time


def test_ctrl_c_saves_and_the_rerun_resumes_exactly(straight_run, tmp_path, tokenizer_path,
                                                    monkeypatch):
  import signal
  _, expected = straight_run
  real_write = loop.metrics_lib.MetricsWriter.write

  def write_then_interrupt(self, step, metrics, kind="train"):
    real_write(self, step, metrics, kind)
    if kind == "train" and step == 2:
      signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C during step 2's logging

  monkeypatch.setattr(loop.metrics_lib.MetricsWriter, "write", write_then_interrupt)
  ctx = run(tmp_path, stage(tokenizer_path, every=100))
  # The step under way finishes, is saved, and the run stops (6 steps were planned).
  assert ctx.stopped == ("pretrain", 3)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints/pretrain"), 1).all_steps() == [3]
  monkeypatch.setattr(loop.metrics_lib.MetricsWriter, "write", real_write)
  resumed = params_of(run(tmp_path, stage(tokenizer_path, every=100)))
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)
  # A second Ctrl-C stops at once.
  with loop._StopRequest() as stop:
    signal.raise_signal(signal.SIGINT)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
