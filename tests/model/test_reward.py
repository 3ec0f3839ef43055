"""The score head: shapes, end-of-sequence reads, LM -> reward-model init, LoRA, refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.errors import CheckpointError, ConfigError
from llmjax.model import lora, reward
from llmjax.model.config import ModelConfig
from llmjax.model.quant import QuantConfig, quantize_model
from llmjax.model.transformer import build_model, logical_axes
from llmjax.sample.sampler import Sampler

LM = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                 max_seq_len=256)
RM = reward.reward_config(LM)


@pytest.fixture(scope="module")
def rm():
  return nnx.split(build_model(RM, seed=1))


def test_score_model_shape_and_params(rm):
  graphdef, params = rm
  assert "lm_head" not in params and params["score"][...].shape == (64, 1)
  assert logical_axes(params)["score"] == ("embed", None)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == RM.num_params() == LM.num_params() - 512 * 64 + 64
  tied = dataclasses.replace(RM, tie_embeddings=True)
  assert tied.num_params() == RM.num_params()  # no lm_head either way
  model = nnx.merge(graphdef, params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)))
  scores = model(tokens)
  assert scores.shape == (2, 12) and scores.dtype == jnp.float32
  np.testing.assert_array_equal(scores, model.scores(model.hidden_states(tokens)))
  with pytest.raises(ConfigError, match="head 'score'.*call scores"):
    model.logits(model.hidden_states(tokens))
  with pytest.raises(ConfigError, match="head 'lm', not 'score'"):
    build_model(LM).scores(jnp.zeros((1, 2, 64)))
  bf16 = nnx.merge(nnx.split(nnx.eval_shape(
      lambda: build_model(dataclasses.replace(RM, dtype="bfloat16"))))[0], params)
  assert bf16(tokens).dtype == jnp.float32
  with pytest.raises(ConfigError, match="head must be one of"):
    dataclasses.replace(LM, head="value")


def test_sequence_end_mask():
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0],
                             [1, 2, 2, 2, 3, 3, 3, 3],
                             [0, 0, 0, 0, 0, 0, 0, 0]])
  expected = np.asarray([[0, 0, 1, 0, 1, 1, 0, 0],
                         [1, 0, 0, 1, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(reward.sequence_end_mask(segment_ids), expected)


def test_end_scores_match_score_sequences(rm):
  graphdef, params = rm
  seqs = [[5, 6, 7], list(range(10, 30)), [9]]
  ours = reward.score_sequences(graphdef, params, seqs)
  tokens = np.full((3, 24), 511, np.int32)  # right padding of any value
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s

  @jax.jit
  def on_device(p, t, lengths):
    return reward.end_scores(nnx.merge(graphdef, p), t, lengths)
  got = on_device(params, jnp.asarray(tokens), jnp.asarray([3, 20, 1]))
  np.testing.assert_allclose(np.asarray(got), ours, atol=1e-5)
  # Each alone, and in batches of one, gives the same scores.
  alone = [reward.score_sequences(graphdef, params, [s])[0] for s in seqs]
  np.testing.assert_allclose(alone, ours, atol=1e-5)
  np.testing.assert_allclose(reward.score_sequences(graphdef, params, seqs, max_batch=1), ours,
                             atol=1e-5)
  with pytest.raises(ConfigError, match=r"sequences \[1\] are empty"):
    reward.score_sequences(graphdef, params, [[1], []])


def test_init_reward_model_copies_the_lm():
  lm_params = nnx.state(build_model(LM, seed=3))
  state = reward.init_reward_model(lm_params, RM, seed=5)
  assert "lm_head" not in state
  for path, var in nnx.to_flat_state(state):
    if path != ("score",):
      np.testing.assert_array_equal(var[...], dict(nnx.to_flat_state(lm_params))[path][...])
  score = np.asarray(state["score"][...])
  assert score.shape == (64, 1) and 0.01 < score.std() < 0.03  # init_std 0.02
  again = reward.init_reward_model(lm_params, RM, seed=5)
  np.testing.assert_array_equal(again["score"][...], score)
  assert not np.array_equal(reward.init_reward_model(lm_params, RM, seed=6)["score"][...], score)
  model = nnx.merge(nnx.split(nnx.eval_shape(lambda: build_model(RM)))[0], state)
  assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4)
  with pytest.raises(ConfigError, match="head 'lm'"):
    reward.init_reward_model(lm_params, LM)
  with pytest.raises(CheckpointError, match=r"layers/0/mlp/\w+_proj has shape"):
    reward.init_reward_model(lm_params, dataclasses.replace(RM, d_ff=128))
  with_lora = nnx.state(lora.add_lora(build_model(LM), lora.LoraConfig(rank=2)))
  with pytest.raises(CheckpointError, match="merge LoRA adapters"):
    reward.init_reward_model(with_lora, RM)


def test_lora_on_a_score_model(rm):
  graphdef, params = rm
  model = lora.add_lora(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)),
                        lora.LoraConfig(rank=2))
  assert not hasattr(model, "score_lora")
  state = nnx.state(model)
  # B = 0: a fresh adapter changes nothing; merged, the plain score model is back.
  tokens = jnp.arange(8)[None]
  np.testing.assert_allclose(model(tokens), nnx.merge(graphdef, params)(tokens), atol=1e-6)
  lora_state = jax.tree.map(lambda x: x + 0.01, state)  # make every adapter non-zero
  model = nnx.merge(nnx.graphdef(model), lora_state)
  before = model(tokens)
  merged = lora.merge_lora(model)
  assert not lora.has_lora(nnx.state(merged)) and "score" in nnx.state(merged)
  np.testing.assert_allclose(merged(tokens), before, atol=1e-5)
  with pytest.raises(ConfigError, match="has head 'score'.*Leave lm_head out"):
    lora.add_lora(nnx.merge(graphdef, params),
                  lora.LoraConfig(rank=2, target_modules=("q_proj", "lm_head")))
  # quantize_lm_head has nothing to quantize on a score model.
  quantize_model(nnx.merge(graphdef, params), QuantConfig(group_size=32, quantize_lm_head=True))


def test_sampler_refuses_a_reward_model(rm):
  with pytest.raises(ConfigError, match=r"is a reward model \(head 'score'\); it scores text, "
                                        "it does not generate"):
    Sampler(*rm)
