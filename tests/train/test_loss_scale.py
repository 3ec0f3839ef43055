"""float16 training with dynamic loss scaling: the update rule, skipped overflow steps, the
floor, exact resume and the configuration errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.config import PRESETS, ModelConfig, check_dtype_on_backend
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.pretrain import Pretrain
from llmjax.data import pipeline
from llmjax.train import loop
from llmjax.train import loss_scale as ls
from llmjax.train.losses import lm_objective
from llmjax.train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule

from tests.conftest import TEST_MODEL

SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=256, d_model=32, d_ff=64, n_heads=2,
                            n_kv_heads=1, dtype="float16")


def reference_scales(flags, initial, interval, factor):
  """The dynamic-scale rule written out: (scale, skipped) after each step's finite flag."""
  scale, good, skipped, out = initial, 0, 0, []
  for finite in flags:
    if finite:
      good += 1
      if good == interval:
        scale, good = scale * factor, 0
    else:
      scale, good, skipped = scale / factor, 0, skipped + 1
    out.append((scale, skipped))
  return out


def test_update_grows_after_n_finite_steps_halves_on_overflow_and_stops_below_floor():
  cfg = ls.LossScale(initial=8.0, growth_interval=3, factor=2.0, min_scale=1.0)
  flags = [True, True, True, True, False, True, True, True, False, False, False, False, False]
  state, got = ls.init(cfg), []
  for finite in flags:
    state = ls.update(state, jnp.asarray(finite), cfg)
    got.append((float(state["scale"]), int(state["skipped_steps"])))
  assert got == reference_scales(flags, 8.0, 3, 2.0)
  assert got[2] == (16.0, 0) and got[4] == (8.0, 1)  # grew at the 3rd finite step, then halved
  floors = [bool(ls.below_floor({"scale": jnp.float32(s)}, cfg)) for s, _ in got]
  assert floors == [s < 1.0 for s, _ in got] and floors[-1] and not floors[-2]  # 0.5 < 1 = min
  fixed = ls.LossScale(initial=128.0, dynamic=False)
  assert ls.update(ls.init(fixed), jnp.asarray(False), fixed)["scale"] == 128.0


def test_growth_stops_short_of_float32_overflow():
  cfg = ls.LossScale(initial=2.0 ** 127, growth_interval=1)
  state = ls.update(ls.init(cfg), jnp.asarray(True), cfg)
  assert float(state["scale"]) == 2.0 ** 127


def _batch(poison: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, SMALL.vocab_size, (4, 16)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "loss_mask": np.ones((4, 16), np.float32), "segment_ids": np.ones((4, 16), np.int32),
          "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)).copy(),
          "poison": np.full((4,), poison)}


def _poisonable(model, roles, batch):
  """lm_objective, with an Inf injected into the loss of a batch flagged `poison`."""
  loss_sum, count, aux = lm_objective()(model, roles, batch)
  return loss_sum * jnp.where(batch["poison"].any(), jnp.inf, 1.0), count, aux


@pytest.fixture(scope="module")
def fp16_step():
  graphdef, params = loop.init_params(SMALL, seed=0)
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
  tx = build_optimizer(opt, 20)
  cfg = ls.LossScale(growth_interval=2)
  step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, learning_rate_schedule(opt, 20),
                                      _poisonable, 2, cfg))
  state = loop.init_train_state({"policy": params}, tx, loss_scale=cfg)
  return (lambda s, b: step(s, {"policy": nnx.State({})}, b)), state


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_overflow_step_is_skipped_scale_halved_and_training_continues(fp16_step):
  step, s0 = fp16_step
  s1, _ = step(s0, _batch(False, 1))
  s2, m2 = step(s1, _batch(False, 2))
  assert float(s1["loss_scale"]["scale"]) == 2.0 ** 15 and float(m2["loss_scale"]) == 2.0 ** 16
  assert not _same(s1["params"], s2["params"])
  s3, m3 = step(s2, _batch(True, 3))  # the injected Inf
  assert not np.isfinite(float(m3["loss"]))
  assert _same(s3["params"], s2["params"]) and _same(s3["opt_state"], s2["opt_state"])
  assert float(s3["loss_scale"]["scale"]) == 2.0 ** 15  # halved from 2**16
  assert int(s3["loss_scale"]["skipped_steps"]) == int(m3["skipped_steps"]) == 1
  assert int(s3["first_bad_step"]) == -1 and int(s3["step"]) == 3  # skipped, not diverged
  s4, m4 = step(s3, _batch(False, 4))
  assert not _same(s4["params"], s3["params"]) and np.isfinite(float(m4["grad_norm"]))
  assert int(s4["loss_scale"]["skipped_steps"]) == 1 and int(s4["first_bad_step"]) == -1


def test_a_real_float16_overflow_is_skipped(fp16_step):
  """No injection: a scale of 2**30 makes the float16 backward overflow (its logit
  gradients reach 2**30 / 32 tokens per microbatch > 65504); the step is skipped."""
  step, s0 = fp16_step
  big = {**s0, "loss_scale": {**s0["loss_scale"], "scale": jnp.float32(2.0 ** 30)}}
  s1, m1 = step(big, _batch(False, 1))
  assert np.isfinite(float(m1["loss"])) and not np.isfinite(float(m1["grad_norm"]))
  assert _same(s1["params"], s0["params"]) and float(s1["loss_scale"]["scale"]) == 2.0 ** 29
  ok, m_ok = step(s0, _batch(False, 1))  # the default 2**15 does not overflow
  assert np.isfinite(float(m_ok["grad_norm"])) and int(ok["loss_scale"]["skipped_steps"]) == 0


def test_overflow_at_the_floor_stops_the_run(fp16_step):
  step, s0 = fp16_step
  at_floor = {**s0, "step": jnp.int32(6),
              "loss_scale": {**s0["loss_scale"], "scale": jnp.float32(1.0)}}
  s1, _ = step(at_floor, _batch(True))
  assert int(s1["first_bad_step"]) == 7 and _same(s1["params"], s0["params"])


def _fp16_stage(tokenizer_path, total_steps=6):
  return Pretrain(
      model=dataclasses.replace(TEST_MODEL, dtype="float16"),
      data=pipeline.DataConfig(seq_len=32, batch_size=4, eval_batches=1),
      # 2**20 overflows the float16 backward at first: the runs skip a step and back off
      # before the checkpoint at step 2, then grow after 2 finite steps and overflow again.
      train=loop.TrainConfig(total_steps=total_steps, log_every=1, eval_every=total_steps,
                             checkpoint_every=2, loss_scale_initial=2.0 ** 20,
                             loss_scale_growth_interval=2),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      tokenizer=TokenizerConfig(path=tokenizer_path))


def test_fp16_resume_is_bit_exact(tmp_path, tokenizer_path):
  s = _fp16_stage(tokenizer_path)
  straight = run_stages([s], RunContext(workdir=str(tmp_path / "straight")))
  run_stages([s], RunContext(workdir=str(tmp_path / "resumed"), stop_after=2))
  resumed = run_stages([s], RunContext(workdir=str(tmp_path / "resumed")))
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.outputs["pretrain"].params)),
                  jax.tree.leaves(jax.device_get(straight.outputs["pretrain"].params))):
    np.testing.assert_array_equal(a, b)
  records = {name: [(r["step"], r["loss"], r["loss_scale"], r["skipped_steps"])
                    for r in read_metrics(str(tmp_path / name)) if r["kind"] == "train"]
             for name in ("straight", "resumed")}
  assert records["resumed"] == records["straight"]
  # Measured: skipped steps 1, 1, 1, 2, 3, 4 and the scale 2**19, 2**19, 2**20, 2**19, ...:
  # the growth at step 3 needs the good-step count saved at step 2.
  scales, skipped = ([r[2] for r in records["straight"]], [r[3] for r in records["straight"]])
  assert skipped[1] > 0 and skipped[-1] > skipped[1]  # overflows before and after the resume
  assert any(b > a for a, b in zip(scales[1:], scales[2:]))  # and growth after it


def test_settings_by_dtype_and_backend():
  train = loop.TrainConfig()
  assert train.resolved_loss_scale("float16") == ls.LossScale()
  assert train.resolved_loss_scale("bfloat16") is None
  assert dataclasses.replace(train, loss_scale="none").resolved_loss_scale("float16") is None
  fixed = dataclasses.replace(train, loss_scale=1024).resolved_loss_scale("float16")
  assert fixed.initial == 1024.0 and not fixed.dynamic
  with pytest.raises(ConfigError, match="'bfloat16', which has float32's exponent range"):
    dataclasses.replace(train, loss_scale="dynamic").resolved_loss_scale("bfloat16")
  with pytest.raises(ConfigError, match="loss_scale must be 'dynamic'"):
    dataclasses.replace(train, loss_scale="auto").resolved_loss_scale("float16")
  with pytest.raises(ConfigError, match="loss_scale_factor must be > 1"):
    loop.TrainConfig(loss_scale_factor=1.0)
  with pytest.raises(ConfigError, match="not supported on TPU.*use dtype='bfloat16'"):
    check_dtype_on_backend(SMALL, "tpu")
  check_dtype_on_backend(SMALL, "gpu")
  check_dtype_on_backend(dataclasses.replace(SMALL, dtype="bfloat16"), "tpu")
  with pytest.raises(ConfigError, match="param_dtype 'float16' is not supported"):
    dataclasses.replace(SMALL, param_dtype="float16")
  with pytest.raises(ConfigError, match="dtype must be one of"):
    ModelConfig(**{**dataclasses.asdict(SMALL), "dtype": "float8"})


def test_resume_across_a_dtype_change_adds_or_drops_the_scale(tmp_path):
  """ModelConfig.dtype may change between runs: a float16 checkpoint resumed in bfloat16
  drops its scale; a bfloat16 one resumed in float16 starts scaling at the initial scale."""
  from llmjax import checkpoint as ckpt_lib
  from llmjax.parallel import mesh as mesh_lib
  rep = mesh_lib.replicated(mesh_lib.mesh_and_rules(None, None)[0])
  cfg = ls.LossScale()
  plain = {"params": {"w": jnp.arange(3.0)}, "step": jnp.int32(5)}
  scaled = {**plain, "loss_scale": {**ls.init(cfg), "scale": jnp.float32(4.0),
                                    "skipped_steps": jnp.int32(9)}}
  for name, saved in (("fp16", scaled), ("bf16", plain)):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / name), every=1, async_save=False)
    ckpt.save(5, saved, None, {"step": 5})
    for now in (plain, {**plain, "loss_scale": ls.init(cfg)}):
      got = loop._restore_with_loss_scale(ckpt, 5, now, None, "loss_scale" in saved, rep)
      assert got.keys() == now.keys() and int(got["step"]) == 5
      if "loss_scale" in now:  # the saved scale when there is one, else a fresh one
        want = saved.get("loss_scale", now["loss_scale"])
        assert jax.tree.map(float, got["loss_scale"]) == jax.tree.map(float, want)
    ckpt.close()
