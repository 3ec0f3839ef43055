"""The ppo stage on a tiny model: the reward model reads the conversation the sampler produced,
exact resume with the adaptive KL coefficient restored, a shared trunk's value loss reaches the
trunk, and refused inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.data import prompts as prompts_lib
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.reward import init_reward_model, reward_config, score_sequences
from llmjax.model.transformer import build_model
from llmjax.rl.rollouts import training_rows
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import StageOutput, TokenizerConfig
from llmjax.stages.ppo import PPOConfig, ppo_objective, ppo_stage, reward_scores, value_head_role
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL

DATA = prompts_lib.PromptDataConfig(format="builtin_questions", max_prompt_tokens=64,
                                    prompts_per_step=4, builtin_train=32, builtin_eval=8,
                                    eval_prompts=4)


def stage(tokenizer_path, model=TEST_MODEL, **ppo_kw):
  return ppo_stage(
      model=model, data=DATA,
      train=loop.TrainConfig(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2),
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
      tokenizer=TokenizerConfig(path=tokenizer_path),
      ppo=PPOConfig(**{"max_new_tokens": 8, "temperature": 1.0, "num_ppo_epochs": 1,
                       "num_mini_batches": 2, "kl_coef": 0.2, "target_kl": 0.5,
                       "kl_horizon": 20, **ppo_kw}))


def context(workdir, tokenizer_path, stop_after=None, rm_vocab=None):
  """A run whose 'sft' (the policy's start) and 'rm' stages are already done."""
  tokenizer = Tokenizer.load(tokenizer_path)
  source = lambda name: {"workdir": str(workdir), "stage": name, "step": 1}
  graphdef, params = nnx.split(build_model(TEST_MODEL, seed=1))
  rm_cfg = reward_config(TEST_MODEL if rm_vocab is None else
                         dataclasses.replace(TEST_MODEL, vocab_size=rm_vocab))
  lm = nnx.state(build_model(dataclasses.replace(rm_cfg, head="lm"), seed=2))
  rm_graphdef = nnx.graphdef(build_model(rm_cfg, seed=3))
  rm_params = init_reward_model(lm, rm_cfg, seed=3)
  ctx = RunContext(workdir=str(workdir), stop_after=stop_after, tokenizer=tokenizer)
  ctx.outputs["sft"] = StageOutput(graphdef, params, TEST_MODEL, source("sft"), tokenizer)
  ctx.outputs["rm"] = StageOutput(rm_graphdef, rm_params, rm_cfg, source("rm"), tokenizer)
  ctx.last_stage = "rm"  # as after pretrain -> sft -> rm: ppo starts from sft, not the rm
  return ctx


def run(workdir, tokenizer_path, st, stop_after=None):
  ctx = run_stages([st], context(workdir, tokenizer_path, stop_after))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(ctx.outputs["ppo"].params))]


def test_resume_is_exact_with_the_adaptive_kl_coefficient(tmp_path, tokenizer_path):
  expected = run(tmp_path / "straight", tokenizer_path, stage(tokenizer_path))
  run(tmp_path / "resumed", tokenizer_path, stage(tokenizer_path), stop_after=3)
  resumed = run(tmp_path / "resumed", tokenizer_path, stage(tokenizer_path))
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)
  records = read_metrics(str(tmp_path / "straight"))
  rows = [m for m in records if m["kind"] == "train"]
  assert [m["step"] for m in rows] == [1, 2, 3, 4]
  rollouts = [m for m in rows if "rollout_seconds" in m]
  assert [m["step"] for m in rollouts] == [1, 3]  # 2 minibatches per rollout
  for m in rollouts:
    assert {"score", "kl", "non_score_reward", "explained_variance", "value_mean"} <= set(m)
  # The controller moved kl_coef after the first rollout (KL far from the target).
  assert rollouts[0]["kl_coef"] == pytest.approx(0.2)
  assert rollouts[1]["kl_coef"] != pytest.approx(0.2)
  assert all(np.isfinite(m["value_loss"]) and np.isfinite(m["policy_loss"]) for m in rows)
  assert all(m["logprob_gap"] < 1e-4 for m in rollouts)
  baseline = [m for m in records if m["kind"] == "baseline"]
  evals = [m for m in records if m["kind"] == "eval"]
  assert baseline and evals and evals[-1]["rm_score_n"] == 4 and "exact_match" in evals[-1]


def test_reward_reads_the_conversation_as_the_template_renders_it(tokenizer_path):
  from llmjax.data import chat
  tokenizer = Tokenizer.load(tokenizer_path)
  rm_cfg = reward_config(TEST_MODEL)
  graphdef, params = nnx.split(build_model(rm_cfg, seed=3))
  question = [{"role": "user", "content": "Where does Alice live?"}]
  end_id, after = chat.after_reply(tokenizer, "chatml")
  assert after  # ChatML renders '\n' after <|im_end|>
  oslo = tokenizer.encode("Oslo")
  prompts = [[tokenizer.bos_id, 10, 11, 12], [tokenizer.bos_id, 20],
             chat.prompt_ids(question, "chatml", tokenizer)]
  # Row 0: cut by the budget; row 1: a stop token that is not the template's end; row 2: a
  # reply ended by <|im_end|>.
  completions = np.zeros((3, 1, 6), np.int32)
  completions[0, 0, :3], completions[1, 0, :1] = [30, 31, 32], [tokenizer.eos_id]
  completions[2, 0, :len(oslo) + 1] = oslo + [end_id]
  lengths = np.asarray([[3], [1], [len(oslo) + 1]])
  rows = training_rows(prompts, completions, lengths, seq_len=40)
  score = jax.jit(lambda p, b: reward_scores(nnx.merge(graphdef, p), b, (end_id, after)))
  got = score(params, {k: jnp.asarray(v) for k, v in rows.items()})
  # Independently: each sequence scored as HF's *ForSequenceClassification reads it, at its
  # last token; the ended reply as the whole conversation the chat template renders (what
  # the rm stage trains on), which goes on past <|im_end|>.
  rendered = chat.render_chat(question + [{"role": "assistant", "content": "Oslo"}], "chatml",
                              tokenizer)[0]
  assert rendered[-len(after) - 1] == end_id
  sequences = [p + c[0, :n[0]].tolist() for p, c, n in zip(prompts[:2], completions, lengths)]
  expected = score_sequences(graphdef, params, sequences + [rendered])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # Without the template's tail the ended reply is read at <|im_end|>: another score.
  plain = jax.jit(lambda p, b: reward_scores(nnx.merge(graphdef, p), b))
  assert abs(float(plain(params, {k: jnp.asarray(v) for k, v in rows.items()})[2]) -
             float(expected[2])) > 1e-4


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_the_value_loss_trains_the_trunk_only_when_shared(tokenizer_path, value_model):
  cfg = PPOConfig(value_model=value_model, cliprange_value=None)
  policy = build_model(TEST_MODEL, seed=1)
  value = (nnx.merge(*nnx.split(value_head_role(TEST_MODEL, 0).build(None)))
           if value_model == "shared" else build_model(reward_config(TEST_MODEL), seed=2))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 200, (2, 8)).astype(np.int32)
  mask = np.zeros((2, 8), np.int32)
  mask[:, 3:7] = 1
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
           "positions": np.tile(np.arange(8), (2, 1)), "segment_ids": np.ones((2, 8), np.int32),
           "old_logps": np.full((2, 8), -5.0, np.float32),
           "old_values": np.zeros((2, 8), np.float32),
           "advantages": rng.normal(size=(2, 8)).astype(np.float32),
           "returns": rng.normal(size=(2, 8)).astype(np.float32),
           "sampler_logps": np.zeros((2, 8), np.float32), "fresh": np.zeros(2, np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  graphdef, params = nnx.split(policy)
  v_graphdef, v_params = nnx.split(value)

  def trunk_grad(vf_coef):
    def loss(p, vp):
      fn = ppo_objective(dataclasses.replace(cfg, vf_coef=vf_coef))
      s, w, _ = fn(nnx.merge(graphdef, p), {"value": nnx.merge(v_graphdef, vp)}, batch)
      return s / w
    grads, v_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, v_params)
    value_grad = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(v_grads))
    assert (value_grad > 0) == (vf_coef > 0)
    return jax.tree.leaves(grads)
  without, with_value = trunk_grad(0.0), trunk_grad(1.0)
  same = all(np.allclose(a, b) for a, b in zip(without, with_value))
  assert same == (value_model == "separate")


def test_bad_reward_models_are_refused(tmp_path, tokenizer_path):
  ctx = context(tmp_path / "vocab", tokenizer_path, rm_vocab=TEST_MODEL.vocab_size * 2)
  with pytest.raises(ConfigError, match="vocabulary of 1024 tokens, this run's model 512"):
    run_stages([stage(tokenizer_path)], ctx)
  ctx = context(tmp_path / "lm", tokenizer_path)
  ctx.outputs["rm"] = ctx.outputs["sft"]
  with pytest.raises(ConfigError, match="is a language model"):
    run_stages([stage(tokenizer_path)], ctx)
  with pytest.raises(ConfigError, match="num_mini_batches=3"):
    stage(tokenizer_path, num_mini_batches=3)
  with pytest.raises(ConfigError, match="kl_estimator"):
    PPOConfig(kl_estimator="k4")


def token_set_reward_model(cfg, rewarded: np.ndarray):
  """A reward model whose score is 1 when a sequence ends in a token of `rewarded`, else 0:
  its blocks add nothing (zero output projections), so the final hidden state is the last
  token's embedding, which points along a 'rewarded' direction for those tokens."""
  graphdef, state = nnx.split(build_model(cfg, seed=0))
  flat = dict(state.flat_state())
  for path, var in flat.items():
    if path[-1] in ("o_proj", "down_proj"):
      var.value = jnp.zeros_like(var.value)
  embed = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
  embed[:, 0] = 1.0
  embed[rewarded, 1] = 1.0
  flat[("embed",)].value = jnp.asarray(embed)
  score = np.zeros((cfg.d_model, 1), np.float32)
  score[1, 0] = 1.0 / np.sqrt(cfg.d_model / 2)  # the RMS-normalised [1, 1, 0...] reads 1
  flat[("score",)].value = jnp.asarray(score)
  return graphdef, nnx.State.from_flat_path(flat)


def test_ppo_finds_the_rewarded_tokens(tmp_path, tokenizer_path):
  """A one-token bandit with a known optimum: 1 for a tenth of the vocabulary, 0 otherwise.
  PPO moves the policy's mass onto the rewarded tokens."""
  rm_cfg = reward_config(TEST_MODEL)
  rewarded = np.arange(TEST_MODEL.vocab_size)[7::10]
  rm_graphdef, rm_params = token_set_reward_model(rm_cfg, rewarded)
  tokens = jnp.asarray(np.arange(TEST_MODEL.vocab_size)[:, None], jnp.int32)
  scores = np.asarray(nnx.merge(rm_graphdef, rm_params)(tokens))[:, 0]
  np.testing.assert_allclose(scores, np.isin(np.arange(TEST_MODEL.vocab_size), rewarded),
                             atol=1e-3)
  ctx = context(tmp_path, tokenizer_path)
  ctx.outputs["rm"] = dataclasses.replace(ctx.outputs["rm"], graphdef=rm_graphdef,
                                          params=rm_params)
  st = ppo_stage(
      model=TEST_MODEL, data=dataclasses.replace(DATA, prompts_per_step=16),
      train=loop.TrainConfig(total_steps=64, log_every=1, eval_every=1000,
                             checkpoint_every=1000),
      # No global-norm clipping: the value model's gradient would dominate the norm.
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=1.0,
                                grad_clip_norm=None),
      tokenizer=TokenizerConfig(path=tokenizer_path),
      ppo=PPOConfig(max_new_tokens=1, temperature=1.0, kl_coef=0.0, num_ppo_epochs=4,
                    num_mini_batches=1))
  run_stages([st], ctx)
  scores = [m["score"] for m in read_metrics(str(tmp_path))
            if m["kind"] == "train" and "score" in m]
  assert np.mean(scores[:3]) < 0.3  # about a tenth of random tokens are rewarded
  assert np.mean(scores[-3:]) > 0.9
