"""`TrainConfig.loss_chunk_size` in the DPO family and the RL objectives: the chunked
per-token statistics (`train.losses.token_stats`) equal the unchunked ones and a plain numpy
softmax, values and gradients, with a sequence that is not a multiple of the chunk; the DPO
(with WPO weights) and GRPO losses and their gradients do not change with chunking; and the
compiled step's temporaries shrink, which is what chunking is for. (lm_loss's padded last
chunk: tests/model/test_speed_variants.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.data import preferences
from llmjax.errors import ConfigError
from llmjax.model.config import PRESETS
from llmjax.model.transformer import build_model
from llmjax.preference.logps import pair_logps
from llmjax.stages.dpo import PreferenceLoss, preference_objective
from llmjax.stages.grpo import GRPOConfig, grpo_objective
from llmjax.train.losses import target_logps, token_stats

# Vocab 512: the suite's tokenizer, for the preference pairs.
CFG = dataclasses.replace(PRESETS["tiny"], d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="module")
def models():
  policy = nnx.split(build_model(CFG, seed=1))
  reference = build_model(CFG, seed=2)
  return policy, reference


def _rows(rng, rows=3, seq=13):
  tokens = rng.integers(1, CFG.vocab_size, (rows, seq)).astype(np.int32)
  loss_mask = (rng.random((rows, seq)) < 0.7).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(seq), (rows, seq)).astype(np.int32),
          "segment_ids": np.ones((rows, seq), np.int32)}


def _numpy_stats(logits, targets):
  """log p(target), entropy, log sum p^2 in float64 from `[rows, seq, vocab]` logits."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logp)
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return picked, -(p * logp).sum(-1), np.log((p * p).sum(-1))


def _close_trees(a, b, rtol=1e-4):
  """Leaf by leaf, to float32 roundoff of sums taken in another order: within rtol, or 1e-5 of
  the leaf's largest entry (near-zero gradient entries are differences of large terms)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    y = np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-5 * float(np.abs(y).max()))


def test_token_stats_chunked_equal_unchunked_and_numpy_values_and_gradients(models):
  (graphdef, params), _ = models
  batch = jax.tree.map(jnp.asarray, _rows(np.random.default_rng(0)))
  w = batch["loss_mask"].astype(jnp.float32)

  def run(chunk):
    def f(p):
      model = nnx.merge(graphdef, p)
      hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
      s = token_stats(model, hidden, batch["targets"], chunk, entropy=True, sum_sq_probs=True)
      # The entropy carries a gradient (PPO's bonus); log sum p^2 (WPO's) is gradient-stopped.
      loss = jnp.sum(s.logps * w) + 0.3 * jnp.sum(s.entropy * w)
      return loss, (s, None if chunk else jax.lax.stop_gradient(model.logits(hidden)))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss, (stats, logits)), grads = run(0)
  (c_loss, (c_stats, _)), c_grads = run(5)  # 13 positions: chunks of 5, 5 and 3 (+2 padding)
  for got, want in zip(stats, _numpy_stats(logits, batch["targets"]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  _close_trees(c_stats, stats)
  assert float(c_loss) == pytest.approx(float(loss), rel=1e-6)
  _close_trees(c_grads, grads)


@pytest.fixture(scope="module")
def pair_batch(tokenizer):
  data = preferences.PreferenceDataConfig(seq_len=128, batch_size=3, max_pairs_per_row=2)
  examples, _ = preferences.tokenize_pairs(preferences.builtin_pairs("train", 12), tokenizer,
                                           "chatml", 128, "drop")
  batch = dict(next(iter(preferences.pair_batches_in_order(examples, data))))
  assert (batch["pair_index"] >= 0).sum() >= 4  # several pairs, two to some rows
  batch.pop("pair_index")
  return jax.tree.map(jnp.asarray, batch)


def test_dpo_loss_with_wpo_weights_unchanged_by_chunking(models, pair_batch):
  (graphdef, params), reference = models
  b = pair_batch
  loss = PreferenceLoss(loss_type="sigmoid", beta=0.2, use_weighting=True)

  def run(chunk):
    fn = preference_objective(loss, 2, precomputed=False, chunk_size=chunk)

    def f(p):
      total, n, aux = fn(nnx.merge(graphdef, p), {"reference": reference}, b)
      return total / n, aux
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (value, aux), grads = run(0)
  (c_value, c_aux), c_grads = run(48)  # 128 positions: chunks of 48, 48, 32 (+16 padding)
  assert float(c_value) == pytest.approx(float(value), rel=1e-5)
  _close_trees(c_aux, aux)
  _close_trees(c_grads, grads)

  # The pair weights themselves, against numpy over the packed layout: per sequence
  # (segment 2k + 1 chosen, 2k + 2 rejected), exp(mean over its completion of
  # log p(target) - log sum_v p_v^2), and w_chosen * w_rejected per pair.
  model = nnx.merge(graphdef, params)
  weights, logits = jax.jit(lambda: (pair_logps(model, b, 2, wpo_weights=True).weights,
                                     model(b["tokens"], b["positions"], b["segment_ids"])))()
  logp, _, lssp = _numpy_stats(logits, b["targets"])
  seg, mask = np.asarray(b["segment_ids"]), np.asarray(b["loss_mask"]) > 0
  want = np.zeros(weights.shape)
  for row in range(seg.shape[0]):
    for k in range(2):
      w = 1.0
      for s in (2 * k + 1, 2 * k + 2):
        on = (seg[row] == s) & mask[row]
        w *= np.exp((logp[row][on] - lssp[row][on]).sum() / max(on.sum(), 1))
      want[row, k] = w if (seg[row] == 2 * k + 1).any() else 1.0
  assert (want != 1.0).sum() >= 4  # real pairs, and their weights are not trivially 1
  np.testing.assert_allclose(weights, want, rtol=1e-4)


def test_wpo_weights_only_with_dpo_family_types():
  with pytest.raises(ConfigError, match="use_weighting"):
    PreferenceLoss(loss_type="simpo", use_weighting=True)


def _rollout(rng, prompts=2, group=3, max_new=12, seq=24):
  from llmjax.rl.advantages import group_advantages
  from llmjax.rl.rollouts import training_rows
  lengths = rng.integers(3, max_new + 1, (prompts, group))
  rows = training_rows([list(rng.integers(5, CFG.vocab_size, 6)) for _ in range(prompts)],
                       rng.integers(5, CFG.vocab_size, (prompts, group, max_new)), lengths, seq)
  rows["advantages"] = np.asarray(group_advantages(rng.normal(size=prompts * group), group),
                                  np.float32)
  rows["fresh"] = np.ones(prompts * group, np.float32)
  return jax.tree.map(jnp.asarray, rows)


def test_grpo_loss_unchanged_by_chunking(models):
  (graphdef, params), reference = models
  batch = _rollout(np.random.default_rng(2))
  cfg = GRPOConfig(num_generations=3, max_new_tokens=12, loss_type="dapo", beta=0.04)

  def run(chunk):
    fn = grpo_objective(cfg, chunk)

    def f(p):
      total, n, aux = fn(nnx.merge(graphdef, p), {"reference": reference}, batch)
      return total / n, aux
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (value, aux), grads = run(0)
  (c_value, c_aux), c_grads = run(5)  # the 12-position window: chunks 5, 5, 2 (+3 padding)
  assert float(aux["kl"][0]) > 0 and float(aux["entropy"][0]) > 0  # both terms really run
  assert float(c_value) == pytest.approx(float(value), rel=1e-5)
  _close_trees(c_aux, aux)
  _close_trees(c_grads, grads)


def test_chunking_shrinks_the_compiled_temporaries():
  # Logits dominate: 2 rows x 256 positions x 4096 vocab float32 is 8 MiB per tensor, the
  # model ~0.3 MiB.
  cfg = dataclasses.replace(CFG, vocab_size=4096)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
  rows, seq = 2, 256
  ints = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
  batch = {k: ints for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}

  def temp_bytes(chunk):
    def f(p, b):
      _, logps, entropy = target_logps(nnx.merge(graphdef, p), b, None, chunk)
      return jnp.sum(logps) + 0.1 * jnp.sum(entropy)
    mem = jax.jit(jax.grad(f)).lower(params, batch).compile().memory_analysis()
    if mem is None:
      pytest.skip("memory_analysis() returns None on this backend: no buffer sizes to compare")
    return mem.temp_size_in_bytes

  logits_bytes = rows * seq * cfg.vocab_size * 4
  full, chunked = temp_bytes(0), temp_bytes(16)
  # CPU, jax 0.10: 27.9 MiB (3.5 logits-sized buffers) vs 5.4 MiB (about 3 chunk-sized
  # ones, 0.25 MiB each, on top of the model's gradients and activations).
  assert full > 3 * logits_bytes, full  # the logits and their softmax/gradient at once
  assert chunked < min(logits_bytes, full / 4), (full, chunked)  # not even one logits tensor
