"""The GRPO policy loss family against the papers' formulas, worked out here with plain `math`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.rl import policy_loss as P

# Two completions of three token slots; the last slot of completion 0 is padding.
LOGPS = [[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]
OLD = [[-1.3, -1.9, -0.5], [-1.0, -0.2, -2.5]]  # log-ratios [0.3, -0.1, 0], [-0.5, 0, -0.5]
REF = [[-0.8, -2.4, -0.5], [-1.5, 0.0, -3.3]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
ADV = [1.0, -2.0]
EPS, EPS_HIGH = 0.2, 0.28


def clip(x, lo, hi):
  return min(max(x, lo), hi)


def ppo_term(ratio, adv, eps_low, eps_high):
  """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), PPO's clipped surrogate (negated)."""
  return -min(ratio * adv, clip(ratio, 1 - eps_low, 1 + eps_high) * adv)


def k3(logp, ref):
  d = ref - logp
  return math.exp(d) - d - 1


def token_losses(level="token", eps_high=EPS_HIGH, beta=0.0, bias_correction=True):
  """Per-token losses l_it (padding included, as a list of rows); with bias_correction (TRL
  1.16's use_bias_correction_kl) the KL is weighted by the token's (or GSPO's) ratio."""
  rows = []
  for i in range(2):
    lr = [LOGPS[i][t] - OLD[i][t] for t in range(3)]
    if level == "sequence":  # GSPO: exp of the mean log-ratio over the completion's tokens
      seq = sum(lr[t] * MASK[i][t] for t in range(3)) / sum(MASK[i])
      ratios = [math.exp(seq)] * 3
    else:
      ratios = [math.exp(x) for x in lr]
    w = ratios if bias_correction else [1.0] * 3
    rows.append([ppo_term(ratios[t], ADV[i], EPS, eps_high)
                 + beta * w[t] * k3(LOGPS[i][t], REF[i][t]) for t in range(3)])
  return rows


def aggregate(rows, loss_type, max_len=4, num_items=None):
  sums = [sum(rows[i][t] * MASK[i][t] for t in range(3)) for i in range(2)]
  tokens = sum(map(sum, MASK))
  if loss_type == "grpo":
    return sum(sums[i] / sum(MASK[i]) for i in range(2)) / 2
  if loss_type == "bnpo":
    return sum(sums) / tokens
  if loss_type == "dr_grpo":
    return sum(sums) / (2 * max_len)
  return sum(sums) / (num_items or tokens)


def loss(**kw):
  kw.setdefault("epsilon_high", EPS_HIGH)
  kw.setdefault("max_completion_length", 4)
  return P.policy_loss(jnp.array(LOGPS), jnp.array(OLD), jnp.array(ADV), jnp.array(MASK), **kw)


@pytest.mark.parametrize("loss_type", P.LOSS_TYPES)
@pytest.mark.parametrize("level", P.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("beta, bias_correction", [(0.0, True), (0.1, True), (0.1, False)])
def test_loss_matches_formula(loss_type, level, beta, bias_correction):
  got, metrics = loss(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                      ref_logps=jnp.array(REF) if beta else None,
                      use_bias_correction_kl=bias_correction)
  rows = token_losses(level, beta=beta, bias_correction=bias_correction)
  assert float(got) == pytest.approx(aggregate(rows, loss_type), rel=1e-5)
  if beta:
    # The logged KL is the weighted one, as TRL logs it.
    kl_rows = [[(rows[i][t] - token_losses(level)[i][t]) / beta for t in range(3)]
               for i in range(2)]
    kl = sum(kl_rows[i][t] * MASK[i][t] for i in range(2) for t in range(3)) / 5
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-5)
  else:
    assert "kl" not in metrics


def test_numbers_by_hand():
  # Token level, grpo: completion 0 has r = e^0.3 = 1.35 > 1.28 with A = 1 (clipped at 1.28)
  # and r = e^-0.1 (unclipped); completion 1 (A = -2) has r = e^-0.5 = 0.61 < 0.8 twice
  # (clipped at 0.8) and r = 1.
  row0 = (-1.28 - math.exp(-0.1)) / 2
  row1 = (1.6 + 2.0 + 1.6) / 3
  assert float(loss(loss_type="grpo")[0]) == pytest.approx((row0 + row1) / 2, rel=1e-6)
  # GSPO: s_0 = e^{(0.3 - 0.1)/2} = e^0.1 (inside the clip range); s_1 = e^{-1/3} < 0.8.
  got = loss(loss_type="grpo", importance_sampling_level="sequence")[0]
  assert float(got) == pytest.approx((-math.exp(0.1) + 1.6) / 2, rel=1e-6)
  # Sequence level with a token sum: each completion weighs by its length.
  got = loss(loss_type="bnpo", importance_sampling_level="sequence")[0]
  assert float(got) == pytest.approx((-2 * math.exp(0.1) + 3 * 1.6) / 5, rel=1e-6)


def test_dapo_normaliser_and_dr_grpo_constant():
  rows = token_losses()
  got = loss(loss_type="dapo", num_items_in_batch=10.0)[0]
  assert float(got) == pytest.approx(aggregate(rows, "dapo", num_items=10.0), rel=1e-6)
  # Without it, dapo is bnpo over this batch.
  assert float(loss(loss_type="dapo")[0]) == pytest.approx(float(loss(loss_type="bnpo")[0]))
  got = loss(loss_type="dr_grpo", max_completion_length=7)[0]
  assert float(got) == pytest.approx(aggregate(rows, "dr_grpo", max_len=7), rel=1e-6)


def test_clip_higher_is_asymmetric():
  logps = jnp.log(jnp.array([[1.25, 0.75]]))  # ratios 1.25 and 0.75 against old logp 0
  old = jnp.zeros((1, 2))
  mask = jnp.ones((1, 2))

  def per_token(adv, eps_high):
    return float(P.policy_loss(logps, old, jnp.array([adv]), mask, loss_type="dapo",
                               epsilon_high=eps_high)[0]) * 2
  # A > 0: 1.25 is clipped to 1.2 with the symmetric range, not with epsilon_high = 0.28;
  # 0.75 is below 1, where the min picks the unclipped 0.75 either way.
  assert per_token(1.0, None) == pytest.approx(-(1.2 + 0.75), rel=1e-6)
  assert per_token(1.0, 0.28) == pytest.approx(-(1.25 + 0.75), rel=1e-6)
  # A < 0: the lower bound 0.8 binds for 0.75 whatever epsilon_high is; 1.25 is unclipped.
  assert per_token(-1.0, None) == pytest.approx(1.25 + 0.8, rel=1e-6)
  assert per_token(-1.0, 0.28) == pytest.approx(1.25 + 0.8, rel=1e-6)


def test_delta_caps_negative_advantage_ratio():
  logps = jnp.log(jnp.array([[3.0]]))
  args = (logps, jnp.zeros((1, 1)), jnp.array([-1.0]), jnp.ones((1, 1)))
  assert float(P.policy_loss(*args)[0]) == pytest.approx(3.0, rel=1e-6)
  assert float(P.policy_loss(*args, delta=2.0)[0]) == pytest.approx(2.0, rel=1e-6)


def test_clip_metrics():
  _, m = loss(loss_type="grpo")
  # Tokens: (0,0) high-clipped; (1,0), (1,2) low-clipped; 5 real tokens.
  assert float(m["clip_ratio/low_mean"]) == pytest.approx(2 / 5)
  assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
  assert float(m["clip_ratio/region_mean"]) == pytest.approx(3 / 5)
  assert float(m["clip_ratio/low_min"]) == pytest.approx(0.0)
  assert float(m["clip_ratio/high_max"]) == pytest.approx(1 / 2)
  # Sequence level counts completions: completion 1 is low-clipped.
  _, m = loss(loss_type="grpo", importance_sampling_level="sequence")
  assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 2)
  assert float(m["clip_ratio/high_mean"]) == pytest.approx(0.0)
  assert float(m["clip_ratio/low_min"]) == pytest.approx(0.0)


def test_entropy_metric():
  ent = jnp.array([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
  _, m = loss(entropies=ent)
  assert float(m["entropy"]) == pytest.approx(15.0 / 5)


@pytest.mark.parametrize("loss_type", P.LOSS_TYPES)
@pytest.mark.parametrize("level", P.IMPORTANCE_SAMPLING_LEVELS)
def test_on_policy_gradient_is_plain_policy_gradient(loss_type, level):
  """At old_logps == logps the ratio is 1 and d loss / d logp_it = -A_i m_it / normaliser."""
  lp = jnp.array(LOGPS)
  max_len = 4
  f = lambda x: P.policy_loss(x, lp, jnp.array(ADV), jnp.array(MASK), loss_type=loss_type,
                              importance_sampling_level=level,
                              max_completion_length=max_len)[0]
  grad = np.asarray(jax.grad(f)(lp))
  for i in range(2):
    for t in range(3):
      norm = {"grpo": 2 * sum(MASK[i]), "bnpo": 5, "dapo": 5, "dr_grpo": 2 * max_len}[loss_type]
      assert grad[i, t] == pytest.approx(-ADV[i] * MASK[i][t] / norm, abs=1e-7)
  ratio_one = P.policy_loss(lp, lp, jnp.array(ADV), jnp.array(MASK), loss_type=loss_type,
                            importance_sampling_level=level, max_completion_length=max_len)[1]
  assert float(ratio_one["clip_ratio/region_mean"]) == 0.0


def test_empty_completion_does_not_divide_by_zero():
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  for loss_type in P.LOSS_TYPES:
    for level in P.IMPORTANCE_SAMPLING_LEVELS:
      value, m = P.policy_loss(jnp.array(LOGPS), jnp.array(OLD), jnp.array(ADV), mask,
                               loss_type=loss_type, importance_sampling_level=level,
                               max_completion_length=4)
      assert np.isfinite(float(value)) and np.isfinite(float(m["clip_ratio/high_max"]))


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="ppo"), "loss_type 'ppo' is unknown"),
    (dict(importance_sampling_level="segment"), "importance_sampling_level 'segment'"),
    (dict(epsilon=0.3, epsilon_high=0.2), "epsilon_high=0.2 is below epsilon=0.3"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(beta=0.1), "pass ref_logps"),
    (dict(ref_logps=jnp.zeros((2, 3))), "beta=0 ignores them"),
    (dict(beta=-1.0), "beta"),
    (dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),
    (dict(loss_type="grpo", num_items_in_batch=5.0), "num_items_in_batch"),
    (dict(delta=1.1), "delta"),
    (dict(ref_logps=jnp.zeros((2, 4)), beta=0.1), "ref_logps has shape"),
])
def test_validation(kw, match):
  with pytest.raises(ConfigError, match=match):
    loss(**kw)


def test_validation_shapes():
  with pytest.raises(ConfigError, match="advantages must be"):
    P.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3), jnp.ones((2, 3)))
  with pytest.raises(ConfigError, match="mask has shape"):
    P.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 2)))


def test_soft_overlong_penalty():
  # DAPO Eq. (13) with L = 10, C = 4: free up to 6, then (6 - |y|) / 4, then -1 past 10.
  got = P.soft_overlong_penalty(jnp.array([5, 6, 7, 10, 11]), 10, 4)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -1.0, -1.0])
  # TRL's docstring example: 90 tokens of 100 with a 20-token cache.
  assert float(P.soft_overlong_penalty(jnp.array([90]), 100, 20)[0]) == pytest.approx(-0.5)
  np.testing.assert_allclose(P.soft_overlong_penalty(jnp.array([10, 11]), 10, 0), [0.0, -1.0])
  with pytest.raises(ConfigError, match="cache_length"):
    P.soft_overlong_penalty(jnp.array([1]), 10, 11)
  with pytest.raises(ConfigError, match="max_completion_length"):
    P.soft_overlong_penalty(jnp.array([1]), 0, 0)


def test_masks():
  mask = P.completion_mask(jnp.array([2, 3, 0]), 3)
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1], [0, 0, 0]])
  got = P.mask_truncated_completions(mask, jnp.array([True, False, True]))
  np.testing.assert_array_equal(got, [[1, 1, 0], [0, 0, 0], [0, 0, 0]])
  with pytest.raises(ConfigError, match="stopped has shape"):
    P.mask_truncated_completions(mask, jnp.array([True]))
