"""The grpo stage on a tiny model: rollouts from the live parameters, exact resume (also in the
middle of a num_iterations cycle), the rollout batch layout, and clear errors."""


import jax
import numpy as np
import pytest
from flax import nnx

from llmjax.data import prompts as prompts_lib
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.transformer import build_model
from llmjax.rl.rollouts import (GroupAdvantages, Reward, RewardError, RolloutConfig,
                                 RolloutSource, training_rows)
from llmjax.sample.sampler import Sampler
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.grpo import GRPOConfig, grpo_stage
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL

DATA = prompts_lib.PromptDataConfig(format="builtin", max_prompt_tokens=96, prompts_per_step=2,
                                    builtin_train=32, builtin_eval=8, eval_prompts=4)


def stage(tokenizer_path, **grpo_kw):
  return grpo_stage(
      model=TEST_MODEL, data=DATA,
      train=loop.TrainConfig(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
      tokenizer=TokenizerConfig(path=tokenizer_path),
      grpo=GRPOConfig(**{"num_generations": 4, "max_new_tokens": 8, "temperature": 1.0,
                         # A reward with a spread even for a random model (whose completions
                         # all run to the budget): longer text is better.
                         "rewards": ("math_answer", "tests.rl.test_grpo_stage.length_reward"),
                         **grpo_kw}))


def length_reward(completion: str, num_tokens: int) -> float:
  return len(completion) / (8.0 * max(num_tokens, 1))


def run(workdir, st, stop_after=None):
  ctx = run_stages([st], RunContext(workdir=str(workdir), stop_after=stop_after))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(ctx.outputs["grpo"].params))]


@pytest.mark.parametrize("num_iterations,minibatches,stop_at", [(1, 1, 2), (2, 1, 3),
                                                                 (1, 2, 3)])
def test_resume_is_exact(tmp_path, tokenizer_path, num_iterations, minibatches, stop_at):
  kw = dict(num_iterations=num_iterations, steps_per_generation=minibatches)
  expected = run(tmp_path / "straight", stage(tokenizer_path, **kw))
  run(tmp_path / "resumed", stage(tokenizer_path, **kw), stop_after=stop_at)
  resumed = run(tmp_path / "resumed", stage(tokenizer_path, **kw))
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)
  rows = [m for m in read_metrics(str(tmp_path / "straight")) if m["kind"] == "train"]
  assert [m["step"] for m in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in rows)
  # A rollout every num_iterations x minibatches steps, its metrics with the step that made it.
  rollout_steps = [m["step"] for m in rows if "rollout_seconds" in m]
  assert rollout_steps == list(range(1, 5, num_iterations * minibatches))
  assert all("rewards/length_reward/mean" in m for m in rows if "rollout_seconds" in m)
  if num_iterations * minibatches == 1:  # on-policy: the ratio is exactly 1, nothing clipped
    assert all(m["clip_ratio/region_mean"] == 0.0 for m in rows)
  # The sampler's log-probs are the training forward pass's (float32, same model).
  assert all(m["logprob_gap"] < 1e-4 for m in rows if "rollout_seconds" in m)
  evals = [m for m in read_metrics(str(tmp_path / "straight")) if m["kind"] == "eval"]
  assert evals and evals[-1]["accuracy_n"] == 4


class _Prompts:
  """A fixed prompt group, as a PromptIterator yields them."""

  def __init__(self, items):
    self.items = items

  def __next__(self):
    return self.items

  def get_state(self):
    return b""

  def set_state(self, state):
    del state


def test_rollouts_come_from_the_parameters_they_are_given(tokenizer_path):
  tokenizer = Tokenizer.load(tokenizer_path)
  items = [{"prompt_ids": [tokenizer.bos_id, 10, 11, 12], "answer": 3.0, "question": "q"}]
  cfg = RolloutConfig(num_generations=4, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                      num_iterations=1, mask_truncated_completions=False, seq_len=16, seed=0)
  graphdef, params_a = nnx.split(build_model(TEST_MODEL, seed=1))
  params_b = nnx.state(build_model(TEST_MODEL, seed=2))

  def batch(params):
    source = RolloutSource(_Prompts(items), lambda gd, p: Sampler(gd, p, tokenizer),
                           [Reward("len", length_reward)], cfg, GroupAdvantages(4))
    return source.next_batch(loop.PolicyView(graphdef, params, 0))
  a, a_again, b = batch(params_a), batch(params_a), batch(params_b)
  np.testing.assert_array_equal(a["tokens"], a_again["tokens"])  # same params, same samples
  assert not np.array_equal(a["tokens"], b["tokens"])  # new params, new samples
  assert a["tokens"].shape == (4, 16) and a["advantages"].shape == (4,)


def test_minibatches_split_one_rollout_into_steps(tokenizer_path):
  tokenizer = Tokenizer.load(tokenizer_path)
  items = [{"prompt_ids": [tokenizer.bos_id, 10 + i, 11, 12], "answer": 3.0, "question": "q"}
           for i in range(2)]
  cfg = dict(num_generations=4, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
             num_iterations=2, mask_truncated_completions=False, seq_len=16, seed=0)
  graphdef, params = nnx.split(build_model(TEST_MODEL, seed=1))
  forward = lambda gd, p, b: np.full(b["tokens"].shape, -1.5, np.float32)

  def source(minibatches):
    return RolloutSource(_Prompts(items), lambda gd, p: Sampler(gd, p, tokenizer),
                         [Reward("len", length_reward)],
                         RolloutConfig(**cfg, minibatches=minibatches),
                         GroupAdvantages(4, needs_old_logps=True, old_logps_fn=forward))
  view = loop.PolicyView(graphdef, params, 0)
  whole = source(1).next_batch(view)
  split = source(2)
  steps = [split.next_batch(view) for _ in range(4)]  # 2 minibatches x 2 passes
  assert split.rollouts == 1  # one rollout fed all four steps
  assert all(b["tokens"].shape == (4, 16) for b in steps)
  # The two minibatches hold the rollout's rows (shuffled), each once, advantages and all.
  rows = lambda b: sorted(map(tuple, np.column_stack([b["tokens"], b["advantages"]])))
  merged = {k: np.concatenate([steps[0][k], steps[1][k]]) for k in ("tokens", "advantages")}
  assert rows(merged) == rows(whole)
  assert not np.array_equal(merged["tokens"], whole["tokens"])  # mixed across groups
  for k in ("tokens", "advantages", "old_logps"):  # the second pass repeats the first
    np.testing.assert_array_equal(steps[2][k], steps[0][k])
  assert np.all(steps[0]["old_logps"] == -1.5)  # kept: the second minibatch is off-policy
  assert [b["fresh"][0] for b in steps] == [1.0, 0.0, 0.0, 0.0]


class _Cycle:
  """Prompt groups in turn, as a PromptIterator yields them."""

  def __init__(self, groups):
    self.groups, self.i = groups, 0

  def __next__(self):
    self.i += 1
    return self.groups[(self.i - 1) % len(self.groups)]

  def get_state(self):
    return b""

  def set_state(self, state):
    del state


def test_dynamic_sampling_replaces_groups_without_a_spread(tokenizer_path):
  tokenizer = Tokenizer.load(tokenizer_path)
  flat = {"prompt_ids": [tokenizer.bos_id, 10, 11], "answer": 1.0, "question": "flat"}
  varied = {"prompt_ids": [tokenizer.bos_id, 20, 21], "answer": 2.0, "question": "varied"}

  def reward(completion: str, reference: float) -> float:
    return 1.0 if reference == 1.0 else float(len(completion))  # flat: no spread
  graphdef, params = nnx.split(build_model(TEST_MODEL, seed=1))
  cfg = dict(num_generations=4, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
             num_iterations=1, mask_truncated_completions=False, seq_len=16, seed=0)
  for dynamic, expected_rounds in ((False, 1), (True, 2)):
    source = RolloutSource(_Cycle([[flat, varied], [varied, flat]]),
                           lambda gd, p: Sampler(gd, p, tokenizer), [Reward("r", reward)],
                           RolloutConfig(**cfg, dynamic_sampling=dynamic), GroupAdvantages(4))
    batch = source.next_batch(loop.PolicyView(graphdef, params, 0))
    metrics = source.metrics()
    groups = np.abs(batch["advantages"]).reshape(2, 4).sum(-1)
    assert metrics["sampling_rounds"] == expected_rounds
    assert metrics["frac_zero_spread_groups"] == 0.5
    # Without: one of the two groups teaches nothing; with: both have a spread.
    assert (groups > 0).sum() == (2 if dynamic else 1)
    assert batch["tokens"].shape == (8, 16)


def test_training_rows_layout():
  rows = training_rows([[1, 2, 3]], np.array([[[7, 8, 9], [5, 0, 0]]]), np.array([[3, 1]]), 8)
  np.testing.assert_array_equal(rows["tokens"][0], [1, 2, 3, 7, 8, 0, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [2, 3, 7, 8, 9, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["tokens"][1], [1, 2, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 0, 0, 0, 0, 0])
  rows = training_rows([[1, 2, 3]], np.array([[[7, 8, 9]]]), np.array([[2]]), 8,
                       logprobs=np.array([[[-0.5, -1.5, -9.0]]]))
  np.testing.assert_array_equal(rows["sampler_logps"][0], [0, 0, -0.5, -1.5, 0, 0, 0, 0])


def test_bad_settings_and_failing_rewards():
  with pytest.raises(ConfigError, match=r"unknown.*math_answer"):
    GRPOConfig(rewards=("math_anser",))
  with pytest.raises(ConfigError, match=r"epsilon_high=0.1 is below epsilon=0.2"):
    GRPOConfig(epsilon_high=0.1)
  with pytest.raises(ConfigError, match=r"at least 2 completions"):
    GRPOConfig(num_generations=1)
  with pytest.raises(ConfigError, match=r"loss_type='ppo'"):
    GRPOConfig(loss_type="ppo")
  with pytest.raises(ConfigError, match=r"math_answer reward checks numeric answers"):
    grpo_stage(model=TEST_MODEL, train=loop.TrainConfig(total_steps=1),
               data=prompts_lib.PromptDataConfig(format="builtin_questions"))

  def broken(completion):
    raise ValueError("boom")
  with pytest.raises(RewardError, match=r"reward 'broken' raised ValueError: boom.*What is 2"):
    Reward("broken", broken)(completion="4", prompt="What is 2 + 2?")


def test_off_policy_steps_chunk_the_old_logps_pass_too(tmp_path, tokenizer_path, monkeypatch):
  """With num_iterations > 1 the whole rollout's old log-probs come from one forward pass,
  the largest logits of the stage: it honours TrainConfig.loss_chunk_size like the loss, and
  its chunked values equal the unchunked ones."""
  from llmjax.stages import grpo as grpo_lib
  from llmjax.train import losses
  chunks = []

  def spy(model, hidden, targets, chunk_size=0, **kw):
    chunks.append((hidden.shape, chunk_size))
    return real(model, hidden, targets, chunk_size, **kw)
  real = losses.token_stats
  monkeypatch.setattr(losses, "token_stats", spy)
  st = stage(tokenizer_path, num_iterations=2)
  st = st.__class__(**{**st.__dict__, "train": loop.TrainConfig(
      total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, loss_chunk_size=3)})
  run(tmp_path / "chunked", st)
  # Traced once each: the old-logps pass over the whole rollout, and the loss's.
  assert len(chunks) >= 2 and all(c == 3 for _, c in chunks), chunks

  graphdef, params = loop.init_params(TEST_MODEL, 0)
  rng = np.random.default_rng(0)
  batch = training_rows([[1, 5, 9], [1, 7]], rng.integers(3, 200, (2, 4, 8)),
                        np.full((2, 4), 8), seq_len=16)
  monkeypatch.setattr(losses, "token_stats", real)
  ctx = RunContext(workdir=str(tmp_path / "x"))
  chunked = grpo_lib._old_logps_fn(ctx, 8, chunk_size=3)(graphdef, params, batch)
  whole = grpo_lib._old_logps_fn(ctx, 8)(graphdef, params, batch)
  assert np.abs(whole).sum() > 0
  np.testing.assert_allclose(chunked, whole, atol=2e-6)
