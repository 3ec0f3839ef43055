"""The distill stage: a frozen teacher, on-policy batches from the live student, exact resume,
tokenizer checks, and stages instanced under their own names."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax.data import chat, instructions
from llmjax.data.tokenizer import Tokenizer, train_tokenizer
from llmjax.distill import batches as batches_lib
from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.transformer import build_model
from llmjax.parallel import mesh as mesh_lib
from llmjax.sample.sampler import Sampler
from llmjax.stages import RunContext, configure_stages, run_stages
from llmjax.stages.context import StageOutput, TokenizerConfig
from llmjax.stages.distill import (TEACHER, Distill, DistillConfig, check_teacher,
                                   distill_objective, teacher_role)
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig
from llmjax.train.roles import policy_role

from tests.conftest import TEST_MODEL

# A teacher of another shape (wider, one more layer) with the student's vocabulary.
TEACHER_MODEL = dataclasses.replace(TEST_MODEL, d_model=96, d_ff=192, n_layers=3)
DATA = instructions.SFTDataConfig(seq_len=64, batch_size=4, builtin_train=200, builtin_eval=20,
                                  eval_batches=1)


@pytest.fixture(scope="module")
def teacher():
  graphdef, params = nnx.split(build_model(TEACHER_MODEL, seed=7))
  return graphdef, params


@pytest.fixture(scope="module")
def train_batch(tokenizer):
  convs, _, _ = instructions.conversations(DATA)
  examples, _ = instructions.tokenize_conversations(convs, tokenizer, "chatml", 64, "drop")
  return dict(next(iter(instructions.train_batches(examples, DATA))))


def context(workdir, tokenizer_path, teacher) -> RunContext:
  ctx = RunContext(workdir=str(workdir))
  ctx.tokenizer = Tokenizer.load(tokenizer_path)
  ctx.finish("teacher", *teacher, TEACHER_MODEL, 0)
  return ctx


def distill_stage(tokenizer_path, **cfg) -> Distill:
  return Distill(
      model=TEST_MODEL, data=DATA,
      train=loop.TrainConfig(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
      tokenizer=TokenizerConfig(path=tokenizer_path),
      distill=DistillConfig(**{"beta": 0.5, "alpha": 0.5, "max_new_tokens": 8, **cfg}),
      teacher_from="teacher", init_from="random", eval_questions=0)


def test_teacher_gets_no_gradient_and_no_optimizer_state(teacher, train_batch):
  roles = {"policy": policy_role(TEST_MODEL, None, seed=1),
           TEACHER: teacher_role(StageOutput(*teacher, TEACHER_MODEL, {}), "float32")}
  rules = mesh_lib.RULE_SETS["fsdp_tensor"]
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
  graphdefs, trainables, frozen = {}, {}, {}
  for name, role in roles.items():
    graphdefs[name], t, frozen[name], _, _ = loop._place_role(role, mesh, rules)
    trainables[name] = t
  assert not jax.tree.leaves(trainables[TEACHER])  # the filter selects none of it
  loss_fn = distill_objective(DistillConfig(beta=0.5, alpha=0.3))
  batch = {k: jnp.asarray(v) for k, v in train_batch.items()}

  # The gradient with respect to every teacher weight is exactly zero (the loss reads it
  # behind roles.Frozen), while the student's is not.
  def loss_of(student_params, teacher_params):
    models = loop._models(graphdefs, {"policy": student_params},
                          {"policy": frozen["policy"], TEACHER: teacher_params})
    total, count, _ = loss_fn(models["policy"], {TEACHER: models[TEACHER]}, batch)
    return total / count
  # Jitted: op by op, the backward pass through both models took 14 s of the suite.
  g_student, g_teacher = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(trainables["policy"],
                                                                     frozen[TEACHER])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student)) > 0

  tx = optax.adamw(1e-3)
  state = loop.init_train_state({"policy": trainables["policy"]}, tx)
  assert "role_params" not in state
  # Adam's two moments for the student's weights (plus the step count), nothing else.
  assert len(jax.tree.leaves(state["opt_state"])) == (
      2 * len(jax.tree.leaves(trainables["policy"])) + 1)


def test_teacher_in_bf16_keeps_its_shape(teacher):
  role = teacher_role(StageOutput(*teacher, TEACHER_MODEL, {}), "bfloat16")
  assert role.config.dtype == role.config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(role.init)} == {jnp.dtype(jnp.bfloat16)}
  model = role.build(role.init)
  assert model.config.dtype == "bfloat16"
  for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(teacher[1])):
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))


def test_vocab_or_tokenizer_mismatch_is_refused_naming_both(teacher, tokenizer, tmp_path):
  other_path = str(tmp_path / "other.model")
  texts = [chat.render_text(c, "chatml") for c in instructions.builtin_conversations("train", 400)]
  other = train_tokenizer(texts, other_path, vocab_size=512)
  out = StageOutput(*teacher, TEACHER_MODEL, {}, tokenizer=other)
  with pytest.raises(ConfigError, match="other.model.*differs.*" + tokenizer.path):
    check_teacher(TEST_MODEL, out, tokenizer, "runs/big")
  check_teacher(TEST_MODEL, dataclasses.replace(out, tokenizer=tokenizer), tokenizer, "runs/big")
  small = dataclasses.replace(out, model_cfg=dataclasses.replace(TEACHER_MODEL, vocab_size=256))
  with pytest.raises(ConfigError, match="'runs/big'.* 256-token vocabulary and the student 512"):
    check_teacher(TEST_MODEL, small, tokenizer, "runs/big")


def sequences(batch):
  """(ids, mask) of every packed sequence of `batch`, row-major."""
  out = []
  for r in range(len(batch["tokens"])):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      ids = batch["tokens"][r, idx].tolist() + [int(batch["targets"][r, idx[-1]])]
      np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(len(idx)))
      out.append((ids, batch["loss_mask"][r, idx].tolist()))
  return out


def test_prompts_and_packing_round_trip(train_batch):
  prompts = batches_lib.prompts_of(train_batch)
  original = sequences(train_batch)
  assert len(prompts) == len(original) > len(train_batch["tokens"])  # several rows' worth
  assert [ids[:len(p)] for (ids, _), p in zip(original, prompts)] == prompts
  # The replies after each prompt are the originals' last replies: masked from the prompt on.
  packed, dropped = batches_lib.pack_sequences(
      [(ids, len(p)) for (ids, _), p in zip(original, prompts)], len(train_batch["tokens"]), 64)
  assert dropped == 0
  repacked = sorted(sequences(packed))
  expected = sorted((ids, [0] * (len(p) - 1) + [1] * (len(ids) - len(p)))
                    for (ids, _), p in zip(original, prompts))
  assert repacked == expected
  _, dropped = batches_lib.pack_sequences([(ids, len(p)) for (ids, _), p in zip(original, prompts)],
                                          1, 64)
  assert dropped > 0


def test_on_policy_batches_come_from_the_current_parameters(tokenizer, train_batch):
  stop_ids = chat.stop_token_ids(tokenizer, "chatml")
  graphdef, params_a = nnx.split(build_model(TEST_MODEL, seed=1))
  params_b = nnx.state(build_model(TEST_MODEL, seed=2))
  prompts = batches_lib.prompts_of(train_batch)

  def on_policy_batch(params):
    source = batches_lib.DistillBatches(
        [train_batch], lambda gd, p: Sampler(gd, p, tokenizer, eos_ids=stop_ids), lmbda=1.0,
        seed=0, max_new_tokens=6, temperature=0.0)
    return source.next_batch(loop.PolicyView(graphdef, params, 0))
  a, b = on_policy_batch(params_a), on_policy_batch(params_b)
  assert (a["sampled"] == 1).all()
  # The trained targets are exactly each parameter set's own greedy replies to the prompts.
  for params, batch in ((params_a, a), (params_b, b)):
    greedy = Sampler(graphdef, params, tokenizer, eos_ids=stop_ids).sample(
        prompts, max_new_tokens=6)
    expected = sum((greedy.completion(i) for i in range(len(prompts))), [])
    got = batch["targets"][batch["loss_mask"] == 1].tolist()
    assert got == expected[:len(got)] and len(got) > len(prompts)
  assert a["targets"][a["loss_mask"] == 1].tolist() != b["targets"][b["loss_mask"] == 1].tolist()
  off = batches_lib.DistillBatches([train_batch], None, lmbda=0.0, seed=0, max_new_tokens=6)
  plain = off.next_batch(loop.PolicyView(graphdef, params_a, 0))
  assert (plain["sampled"] == 0).all()
  np.testing.assert_array_equal(plain["tokens"], train_batch["tokens"])


def run(workdir, tokenizer_path, teacher, stop_after=None, **cfg):
  ctx = context(workdir, tokenizer_path, teacher)
  ctx.stop_after = stop_after
  ctx = run_stages([distill_stage(tokenizer_path, **cfg)], ctx)
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(ctx.outputs["distill"].params))]


def test_resume_is_exact_with_on_policy_steps(tmp_path, tokenizer_path, teacher):
  # Seed 0, lmbda 0.5: steps 0 and 2 sample (one before the interruption, one after it).
  assert [batches_lib.is_on_policy_step(0, s, 0.5) for s in range(4)] == [True, False] * 2
  expected = run(tmp_path / "straight", tokenizer_path, teacher, lmbda=0.5)
  run(tmp_path / "resumed", tokenizer_path, teacher, stop_after=2, lmbda=0.5)
  resumed = run(tmp_path / "resumed", tokenizer_path, teacher, lmbda=0.5)
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)
  records = read_metrics(str(tmp_path / "straight"))
  train = [m for m in records if m["kind"] == "train"]
  assert [m["on_policy"] for m in train] == [1.0, 0.0, 1.0, 0.0]
  assert all(m["jsd"] > 0 for m in train)
  # On-policy rows have no reference reply: no CE there (nothing counted: not in the record).
  assert "ce" not in train[0] and np.isfinite(train[1]["ce"])
  assert train[0]["completion_length"] > 0
  resumed_train = [m for m in read_metrics(str(tmp_path / "resumed")) if m["kind"] == "train"]
  assert [m["loss"] for m in resumed_train] == [m["loss"] for m in train]
  evals = [m for m in records if m["kind"] == "eval"]
  assert evals[-1]["ce"] > 0 and evals[-1]["teacher_forward_tokens_per_sec"] > 0


def test_stages_run_under_their_own_names(tmp_path):
  gin.clear_config()
  try:
    gin.parse_config("""
      pipeline.stages = ['sft', 'ce/sft']
      sft.model = @model_config()
      sft.data = @SFTDataConfig()
      sft.train = @TrainConfig()
      TrainConfig.total_steps = 10
      ce/TrainConfig.total_steps = 3
      ce/sft.init_from = 'random'
    """)
    first, second = configure_stages()
    assert (first.name, second.name) == ("sft", "ce")
    assert (first.train.total_steps, second.train.total_steps) == (10, 3)
    assert (first.init_from, second.init_from) == (None, "random")
    gin.parse_config("pipeline.stages = ['sft', 'sft/dpo']")
    with pytest.raises(ConfigError, match=r"\['sft'\] more than once"):
      configure_stages()
  finally:
    gin.clear_config()
