"""The generalized loop: trainable filters, roles, aux metrics, parameter-driven batches, LoRA
checkpoints that hold adapters alone and resume exactly."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import metrics as metrics_lib
from llmjax.checkpoint import Checkpointer
from llmjax.data import pipeline
from llmjax.errors import CheckpointError, ConfigError
from llmjax.model import lora
from llmjax.runs.load import load_run
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.pretrain import Pretrain
from llmjax.train import loop, roles
from llmjax.train.losses import lm_loss, lm_objective, target_weights
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL

DATA = pipeline.DataConfig(seq_len=32, batch_size=4, eval_batches=1)
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, kernel="xla",
                       target_modules=lora.TARGET_MODULES)
MODEL = dataclasses.replace(TEST_MODEL, tie_embeddings=False)


def stage(tokenizer_path, total_steps=6, lora_cfg=None, init_from=None):
  return Pretrain(
      model=MODEL, data=DATA,
      train=loop.TrainConfig(total_steps=total_steps, log_every=1, eval_every=total_steps,
                             checkpoint_every=3),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      tokenizer=TokenizerConfig(path=tokenizer_path), init_from=init_from, lora=lora_cfg)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer_path):
  """A short float pretraining run: the base the LoRA runs adapt."""
  workdir = str(tmp_path_factory.mktemp("base"))
  run_stages([stage(tokenizer_path)], RunContext(workdir=workdir))
  return workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_path, base_run):
  workdir = str(tmp_path_factory.mktemp("lora"))
  ctx = run_stages([stage(tokenizer_path, lora_cfg=LORA, init_from=base_run)],
                   RunContext(workdir=workdir))
  return workdir, ctx.outputs["pretrain"]


def test_only_adapters_get_optimizer_state(base_run):
  base = load_run(base_run)
  role = roles.policy_role(MODEL, base.params, LORA)
  mesh = loop.mesh_lib.make_mesh(loop.mesh_lib.MeshConfig())
  _, trainable, frozen, _, _ = loop._place_role(role, mesh, loop.mesh_lib.RULE_SETS["data"])
  tx = optax.adamw(1e-3)
  state = loop.init_train_state({"policy": trainable}, tx)
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  adapter_bytes = lora.adapter_bytes(trainable)
  assert nbytes(trainable) == adapter_bytes > 0
  # Adam's two moments of the adapters and one step count: nothing of the base.
  assert nbytes(state["opt_state"]) == 2 * adapter_bytes + 4
  assert nbytes(frozen) == nbytes(base.params)
  assert not lora.has_lora(frozen)


def test_lora_checkpoint_holds_adapters_and_names_its_base(lora_run, base_run):
  workdir, out = lora_run
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"), every=1)
  meta = ckpt.read_meta(6)
  ckpt.close()
  assert meta["base"] == {"workdir": os.path.abspath(base_run), "stage": "pretrain", "step": 6}
  assert meta["lora"]["rank"] == 4
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)
                       for f in fs)
  params_dir = os.path.join(workdir, "checkpoints", "pretrain", "6", "params")
  base_dir = os.path.join(base_run, "checkpoints", "pretrain", "6", "params")
  assert size(params_dir) < 0.5 * size(base_dir)
  # Loading finds the base and gives back the trained model.
  loaded = load_run(workdir)
  tokens = jnp.arange(24).reshape(2, 12) % MODEL.vocab_size
  want = nnx.merge(out.graphdef, out.params)(tokens)
  np.testing.assert_array_equal(nnx.merge(loaded.graphdef, loaded.params)(tokens), want)
  # The adapters trained; the base did not.
  base = load_run(base_run)
  assert lora.has_lora(loaded.params)
  assert float(jnp.abs(nnx.merge(base.graphdef, base.params)(tokens) - want).max()) > 1e-3


def test_a_lora_run_quantizes_with_its_adapters_merged(lora_run, tmp_path):
  from llmjax.model.quant import QuantConfig
  from llmjax.runs.quantize_run import quantize_run
  from llmjax.runs.quantized import eval_loss
  workdir, _ = lora_run
  report = quantize_run(workdir, str(tmp_path / "q"), QuantConfig("int8"), eval_data=DATA)
  run = load_run(workdir)
  batches = pipeline.eval_batches(DATA, run.tokenizer, pipeline.document_sources(DATA)[1])
  # The float side of the report is the LoRA model itself.
  assert report["eval"]["float_loss"] == pytest.approx(
      eval_loss(run.graphdef, run.params, batches), rel=1e-5)
  assert abs(report["eval"]["relative_increase"]) < 0.01


def test_lora_run_with_dropout_resumes_bit_exactly(lora_run, tmp_path, tokenizer_path,
                                                    base_run):
  _, straight = lora_run
  s = stage(tokenizer_path, lora_cfg=LORA, init_from=base_run)
  run_stages([s], RunContext(workdir=str(tmp_path), stop_after=3))
  resumed = run_stages([s], RunContext(workdir=str(tmp_path))).outputs["pretrain"]
  for a, b in zip(leaves(resumed.params), leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


def test_resume_on_another_base_is_refused(lora_run, tokenizer_path, tmp_path, base_run):
  workdir, _ = lora_run
  import shutil
  other = str(tmp_path / "other_base")
  shutil.copytree(base_run, other)
  with pytest.raises(CheckpointError, match="adapters trained on"):
    run_stages([stage(tokenizer_path, total_steps=9, lora_cfg=LORA, init_from=other)],
               RunContext(workdir=workdir))


def test_adapters_whose_base_is_gone_say_where_it_was():
  from llmjax.runs.load import load_base
  gone = {"workdir": "/no/such/run", "stage": "pretrain", "step": 6}
  with pytest.raises(CheckpointError, match="trained on .*/no/such/run.* cannot be found"):
    load_base({"base": gone}, "runs/x/checkpoints/sft/100")


def test_lora_without_a_base_fails_before_any_compile(tokenizer_path, tmp_path):
  with pytest.raises(ConfigError, match="pretrain.lora is set but pretrain has no base"):
    run_stages([stage(tokenizer_path, lora_cfg=LORA)], RunContext(workdir=str(tmp_path)))
  with pytest.raises(ConfigError, match="neither a finished stage of this run"):
    run_stages([stage(tokenizer_path, init_from=str(tmp_path / "nowhere"))],
               RunContext(workdir=str(tmp_path)))


def accuracy_loss(model, roles_, batch):
  """The LM loss with an aux metric: how many targets the model predicts (sum, count)."""
  del roles_
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  w = target_weights(batch)
  hits = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
  loss_sum, count = lm_loss(model, batch)
  return loss_sum, count, {"accuracy": (hits, jnp.sum(w)), "rows": (jnp.float32(
      batch["tokens"].shape[0]), jnp.float32(1.0))}


def test_aux_metrics_add_up_exactly_over_microbatches(tokenizer):
  graphdef, params = loop.init_params(TEST_MODEL, seed=0)
  batch = next(iter(pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])))
  batch["loss_mask"][:2, 20:] = 0  # unequal weights per microbatch
  logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"],
                                       batch["segment_ids"])
  w = np.asarray(target_weights(batch))
  expected = float(((np.argmax(logits, -1) == batch["targets"]) * w).sum() / w.sum())
  tx, sched = optax.sgd(0.0), optax.constant_schedule(0.0)
  for accum in (1, 2, 4):
    step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, sched, accuracy_loss, accum))
    state = loop.init_train_state({"policy": params}, tx)
    new_state, m = step(state, {"policy": nnx.State({})}, batch)
    assert not np.array_equal(new_state["rng"], state["rng"])  # the RNG advances each step
    assert float(m["accuracy"]) == pytest.approx(expected, abs=1e-7)
    # Each microbatch reports (its rows, 1): the sum over them is the batch, the count accum.
    assert float(m["rows"]) == pytest.approx(4 / accum)


@functools.partial(jax.jit, static_argnums=0)
def greedy_targets(graphdef, params, tokens):
  return jnp.argmax(nnx.merge(graphdef, params)(tokens), -1).astype(jnp.int32)


class GreedyEcho(loop.BatchSource):
  """Batches made by the live policy: random prompts, and as targets the policy's own greedy
  next-token predictions (a miniature rollout, one forward pass per batch)."""

  def __init__(self, seed=0, rows=4, length=12):
    self.seed, self.rows, self.length, self.made = seed, rows, length, 0
    self.seen_steps = []

  def next_batch(self, view):
    key = jax.random.fold_in(jax.random.key(self.seed), self.made)
    tokens = np.asarray(jax.random.randint(key, (self.rows, self.length), 0,
                                           MODEL.vocab_size), np.int32)
    targets = np.asarray(greedy_targets(view.graphdef, view.params, tokens))
    ones = np.ones((self.rows, self.length), np.int32)
    self.made += 1
    self.seen_steps.append(view.step)
    positions = np.broadcast_to(np.arange(self.length, dtype=np.int32), ones.shape).copy()
    return {"tokens": tokens, "targets": targets, "loss_mask": ones, "segment_ids": ones,
            "positions": positions}

  def get_state(self):
    return json.dumps({"made": self.made}).encode()

  def set_state(self, state):
    self.made = json.loads(state.decode())["made"]


def train_on_rollouts(workdir, total_steps, stop_after=None, source=None):
  writer = metrics_lib.MetricsWriter(workdir, "rl", total_steps)
  try:
    return loop.train(
        stage="rl", workdir=workdir, policy=roles.policy_role(TEST_MODEL), loss_fn=lm_objective(),
        train_data=source or GreedyEcho(), eval_data=[], writer=writer,
        train_cfg=loop.TrainConfig(total_steps=total_steps, log_every=1, eval_every=100,
                                   checkpoint_every=2),
        opt_cfg=OptimizerConfig(learning_rate=1e-2, warmup_steps=0), stop_after=stop_after)
  finally:
    writer.close()


def test_parameter_driven_batches_resume_exactly(tmp_path):
  straight = train_on_rollouts(str(tmp_path / "a"), 4)
  source = GreedyEcho()
  train_on_rollouts(str(tmp_path / "b"), 4, stop_after=2, source=source)
  assert source.seen_steps == [0, 1]
  resumed_source = GreedyEcho()
  resumed = train_on_rollouts(str(tmp_path / "b"), 4, source=resumed_source)
  assert resumed_source.made == 4 and resumed_source.seen_steps == [2, 3]
  for a, b in zip(leaves(resumed.params), leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


class EchoWithFlag(GreedyEcho):
  """GreedyEcho whose batches carry `odd` `[rows]`: 1 in the 2nd, 4th, ... batch."""

  def next_batch(self, view):
    odd = float(self.made % 2)
    return {**super().next_batch(view), "odd": np.full(self.rows, odd, np.float32)}


def lm_with_an_odd_metric(model, roles_, batch):
  loss_sum, count, _ = lm_objective()(model, roles_, batch)
  return loss_sum, count, {"odd_rows": (jnp.sum(batch["odd"]), jnp.sum(batch["odd"]))}


def test_an_aux_metric_with_nothing_to_average_is_left_out_not_nan(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), "rl", 4)
  try:
    loop.train(stage="rl", workdir=str(tmp_path), policy=roles.policy_role(TEST_MODEL),
               loss_fn=lm_with_an_odd_metric, train_data=EchoWithFlag(), eval_data=[],
               writer=writer,
               train_cfg=loop.TrainConfig(total_steps=4, log_every=1, eval_every=100,
                                          checkpoint_every=100),
               opt_cfg=OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
  finally:
    writer.close()
  def strict(token):  # NaN / Infinity are not JSON: other readers (jq, pandas) choke on them
    raise ValueError(f"{token} in metrics.jsonl")
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line, parse_constant=strict) for line in f]
  train = {r["step"]: r for r in records if r["kind"] == "train"}
  assert sorted(train) == [1, 2, 3, 4]
  assert [train[s].get("odd_rows") for s in (1, 2, 3, 4)] == [None, 1.0, None, 1.0]
  assert all("loss" in r and np.isfinite(r["loss"]) for r in train.values())


SMALL = dataclasses.replace(TEST_MODEL, d_model=32, d_ff=64, n_heads=2, n_kv_heads=1)


def with_teacher_and_value(model, roles_, batch):
  """LM loss + distance to a frozen teacher's logits + a value model regressing on them."""
  loss_sum, count = lm_loss(model, batch)
  w = target_weights(batch)
  student = model(batch["tokens"])
  teacher = roles_["teacher"](batch["tokens"])
  gap = jnp.sum(jnp.mean((student - teacher) ** 2, -1) * w)
  value = roles_["value"](batch["tokens"])[..., 0]
  value_err = jnp.sum((value - jax.lax.stop_gradient(jnp.max(teacher, -1))) ** 2 * w)
  return loss_sum + 1e-3 * gap + value_err, count, {"teacher_gap": (gap, count),
                                                     "value_error": (value_err, count)}


def train_with_roles(workdir, tokenizer, teacher, stop_after=None):
  train_ds = pipeline.train_dataset(DATA, tokenizer, pipeline.document_sources(DATA)[0])
  writer = metrics_lib.MetricsWriter(workdir, "distill", 4)
  try:
    return loop.train(
        stage="distill", workdir=workdir, policy=roles.policy_role(TEST_MODEL),
        roles={"teacher": roles.Role.frozen(*teacher, SMALL),
               "value": roles.policy_role(SMALL, seed=7)},
        loss_fn=with_teacher_and_value, train_data=train_ds, eval_data=[], writer=writer,
        train_cfg=loop.TrainConfig(total_steps=4, log_every=1, eval_every=100,
                                   checkpoint_every=2),
        opt_cfg=OptimizerConfig(learning_rate=1e-2, warmup_steps=0), stop_after=stop_after)
  finally:
    writer.close()


def test_frozen_and_trainable_roles_of_other_shapes_train_checkpoint_and_resume(tmp_path,
                                                                               tokenizer):
  teacher = loop.init_params(SMALL, seed=3)
  teacher_before = leaves(teacher[1])
  straight = train_with_roles(str(tmp_path / "a"), tokenizer, teacher)
  records = [r for r in metrics_lib.read_metrics(str(tmp_path / "a")) if r["kind"] == "train"]
  assert all(np.isfinite(r["teacher_gap"]) and np.isfinite(r["value_error"]) for r in records)
  assert records[-1]["value_error"] < records[0]["value_error"]  # the value role trains
  for a, b in zip(leaves(teacher[1]), teacher_before):  # the teacher does not
    np.testing.assert_array_equal(a, b)
  # The value role's parameters live in the checkpoint's train state and resume with it.
  train_with_roles(str(tmp_path / "b"), tokenizer, teacher, stop_after=2)
  resumed = train_with_roles(str(tmp_path / "b"), tokenizer, teacher)
  for a, b in zip(leaves(resumed.params), leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


def test_a_lora_policy_is_its_own_reference_without_a_second_copy():
  model = lora.add_lora(loop.build_model(MODEL), LORA)
  ref = roles.reference_model(model, {})
  assert isinstance(ref, lora.WithoutAdapters)
  tokens = jnp.arange(16).reshape(2, 8)
  np.testing.assert_array_equal(ref(tokens), loop.build_model(MODEL)(tokens))
  plain = loop.build_model(MODEL)
  with pytest.raises(ConfigError, match="needs a reference model"):
    roles.reference_model(plain, {})
  assert roles.reference_model(plain, {"reference": "given"}) == "given"


def test_frozen_roles_run_without_dropout_and_pass_no_gradient():
  cfg = dataclasses.replace(LORA, dropout=0.5)
  model = lora.add_lora(loop.build_model(MODEL), cfg)
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0: dropout would show
  model = nnx.merge(graphdef, adapters, rest)
  tokens = jnp.arange(16).reshape(2, 8)
  plain = model(tokens)
  with lora.dropout_key(jax.random.key(0)):
    trained_view = model(tokens)
    frozen_view = roles.Frozen(model)(tokens)
  assert float(jnp.abs(trained_view - plain).max()) > 0
  np.testing.assert_array_equal(frozen_view, plain)
  grad = jax.grad(lambda h: jnp.sum(roles.Frozen(model).logits(h)))(jnp.ones((1, 2, 64)))
  assert float(jnp.abs(grad).max()) == 0


def test_a_lora_stage_output_serves_as_a_merged_frozen_role(lora_run):
  _, out = lora_run
  role = out.frozen_role()
  assert role.trainable is nnx.Nothing and not lora.has_lora(role.init)
  tokens = jnp.arange(24).reshape(2, 12) % MODEL.vocab_size
  np.testing.assert_allclose(role.build(role.init)(tokens),
                             nnx.merge(out.graphdef, out.params)(tokens), atol=1e-5)
