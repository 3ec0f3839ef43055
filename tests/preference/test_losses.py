"""Preference losses against the papers' formulas, worked out here with plain `math`."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.preference import losses as L
from llmjax.train.losses import logit_stats

# Three pairs: policy and reference logps (token sums) and completion lengths.
CHOSEN = [-5.0, -12.0, -3.0]
REJECTED = [-7.0, -9.0, -8.0]
REF_CHOSEN = [-6.0, -11.0, -3.5]
REF_REJECTED = [-6.5, -10.0, -7.0]
LEN_C = [4, 10, 2]
LEN_R = [5, 6, 8]
BETA = 0.5


def sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
  return -math.log1p(math.exp(-x))


def pairs():
  """Per pair: (u_c, u_r, d) with u = logp - ref_logp and d = u_c - u_r."""
  out = []
  for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
    out.append((c - rc, r - rr, (c - rc) - (r - rr)))
  return out


def call(loss_type, chosen=CHOSEN, rejected=REJECTED, ref_c=REF_CHOSEN, ref_r=REF_REJECTED,
         len_c=LEN_C, len_r=LEN_R, **kwargs):
  kwargs.setdefault("beta", BETA)
  arr = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return np.asarray(L.dpo_loss(arr(chosen), arr(rejected), arr(ref_c), arr(ref_r),
                               loss_type=loss_type, chosen_lengths=arr(len_c),
                               rejected_lengths=arr(len_r), **kwargs))


def _aot(paired, eps):
  if paired:
    x = sorted(c - r for c, r in zip(CHOSEN, REJECTED))
    y = sorted(c - r for c, r in zip(REF_CHOSEN, REF_REJECTED))
  else:
    x = sorted(u_c for u_c, _, _ in pairs())
    y = sorted(u_r for _, u_r, _ in pairs())
  return [-(1 - eps) * logsig(BETA * (a - b)) - eps * logsig(-BETA * (a - b)) for a, b in zip(x, y)]


def _discopop(d, tau):
  z = BETA * d
  m = sig(z / tau)
  return -logsig(z) * (1 - m) + math.exp(-z) * m


EPS = 0.2
EXO_EPS = 1e-3
b = BETA
# Expected per-pair losses for every loss type, from each paper's formula.
EXPECTED = {
    "sigmoid": (dict(), [-logsig(b * d) for _, _, d in pairs()]),
    "hinge": (dict(), [max(0.0, 1 - b * d) for _, _, d in pairs()]),
    "ipo": (dict(), [(u_c / lc - u_r / lr - 1 / (2 * b)) ** 2
                     for (u_c, u_r, _), lc, lr in zip(pairs(), LEN_C, LEN_R)]),
    "exo_pair": (dict(label_smoothing=EXO_EPS), [
        sig(b * d) * (logsig(b * d) - math.log(1 - EXO_EPS))
        + sig(-b * d) * (logsig(-b * d) - math.log(EXO_EPS)) for _, _, d in pairs()]),
    "nca_pair": (dict(), [-logsig(b * u_c) - 0.5 * logsig(-b * u_c) - 0.5 * logsig(-b * u_r)
                          for u_c, u_r, _ in pairs()]),
    "robust": (dict(label_smoothing=EPS), [
        ((1 - EPS) * -logsig(b * d) - EPS * -logsig(-b * d)) / (1 - 2 * EPS)
        for _, _, d in pairs()]),
    "bco_pair": (dict(), [-logsig(b * u_c) - logsig(-b * u_r) for u_c, u_r, _ in pairs()]),
    "sppo_hard": (dict(), [(u_c - 1 / (2 * b)) ** 2 + (u_r + 1 / (2 * b)) ** 2
                           for u_c, u_r, _ in pairs()]),
    "aot": (dict(label_smoothing=0.1), _aot(True, 0.1)),
    "aot_unpaired": (dict(label_smoothing=0.1), _aot(False, 0.1)),
    "apo_zero": (dict(), [(1 - sig(b * u_c)) + sig(b * u_r) for u_c, u_r, _ in pairs()]),
    "apo_down": (dict(), [sig(b * u_c) + (1 - sig(b * d)) for u_c, _, d in pairs()]),
    "discopop": (dict(discopop_tau=0.3), [_discopop(d, 0.3) for _, _, d in pairs()]),
    "sft": (dict(), [-sum(CHOSEN) / sum(LEN_C)] * 3),
    "sigmoid_norm": (dict(), [-logsig(b * (u_c / lc - u_r / lr))
                              for (u_c, u_r, _), lc, lr in zip(pairs(), LEN_C, LEN_R)]),
}


def test_every_loss_type_has_a_hand_computed_case():
  assert set(EXPECTED) == set(L.LOSS_TYPES)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_loss_type_matches_paper_formula(loss_type):
  kwargs, expected = EXPECTED[loss_type]
  np.testing.assert_allclose(call(loss_type, **kwargs), expected, rtol=2e-6, atol=1e-6)


def test_robust_without_smoothing_is_sigmoid():
  np.testing.assert_allclose(call("robust", label_smoothing=0.0), call("sigmoid"), rtol=1e-6)


def test_sigmoid_label_smoothing_is_cdpo():
  eps = 0.15
  swapped = call("sigmoid", chosen=REJECTED, rejected=CHOSEN, ref_c=REF_REJECTED,
                 ref_r=REF_CHOSEN)
  np.testing.assert_allclose(call("sigmoid", label_smoothing=eps),
                             (1 - eps) * call("sigmoid") + eps * swapped, rtol=1e-6)


def test_ipo_is_length_normalised():
  base = call("ipo")
  assert not np.allclose(call("ipo", len_c=[8, 10, 2]), base)
  double = lambda xs: [2 * x for x in xs]
  # Doubling the logratios (via the policy logps) and the lengths leaves per-token ratios alone.
  doubled = call("ipo", chosen=[2 * u + r for (u, _, _), r in zip(pairs(), REF_CHOSEN)],
                 rejected=[2 * u + r for (_, u, _), r in zip(pairs(), REF_REJECTED)],
                 len_c=double(LEN_C), len_r=double(LEN_R))
  np.testing.assert_allclose(doubled, base, rtol=1e-5)


def test_hinge_is_zero_past_the_margin():
  beta = 0.5  # margin 1 / beta = 2 on the log-ratio difference d
  past = call("hinge", chosen=[-1.0], rejected=[-4.5], ref_c=[0.0], ref_r=[-1.0], len_c=None,
              len_r=None, beta=beta)  # d = 2.5
  short = call("hinge", chosen=[-1.0], rejected=[-2.5], ref_c=[0.0], ref_r=[-1.0], len_c=None,
               len_r=None, beta=beta)  # d = 0.5
  assert past[0] == 0.0
  assert short[0] == pytest.approx(1 - beta * 0.5)


def test_combined_loss_types_are_the_weighted_sum():
  types = ["sigmoid", "bco_pair", "sft", "ipo"]
  weights = [0.8, 0.2, 1.0, 0.5]
  combined = call(types, loss_weights=weights)
  np.testing.assert_allclose(combined, sum(w * call(t) for t, w in zip(types, weights)),
                             rtol=1e-6)
  np.testing.assert_allclose(call(["sigmoid", "hinge"]), call("sigmoid") + call("hinge"),
                             rtol=1e-6)


def test_label_smoothing_applies_to_every_type_that_uses_it():
  np.testing.assert_allclose(call(["robust", "hinge"], label_smoothing=EPS),
                             call("robust", label_smoothing=EPS) + call("hinge"), rtol=1e-6)


def test_forward_kl_scores():
  # forward KL: s = -exp(-u)
  d = [-math.exp(-u_c) + math.exp(-u_r) for u_c, u_r, _ in pairs()]
  np.testing.assert_allclose(call("sigmoid", f_divergence_type="forward_kl"),
                             [-logsig(BETA * x) for x in d], rtol=1e-6)


def test_pair_weights_multiply_each_pair():
  w = [0.5, 2.0, 0.0]
  np.testing.assert_allclose(call("sigmoid", pair_weights=jnp.asarray(w)),
                             np.asarray(w) * call("sigmoid"), rtol=1e-6)


def test_wpo_weight_is_one_for_uniform_logits():
  # All logits equal: logp = -log V and the alignment term is -log V, so every weight is 1.
  vocab = 7
  logits = jnp.zeros((2, 3, vocab))
  token_logps = jnp.full((2, 3), -math.log(vocab))
  mask = jnp.asarray([[1, 1, 0], [0, 1, 1]])
  log_sum_sq_probs = logit_stats(logits, jnp.zeros((2, 3), jnp.int32),
                                 sum_sq_probs=True).log_sum_sq_probs
  np.testing.assert_allclose(log_sum_sq_probs, -math.log(vocab), rtol=1e-6)  # sum p^2 = 1/V
  np.testing.assert_allclose(L.wpo_weights(token_logps, log_sum_sq_probs, mask), [1.0, 1.0],
                             rtol=1e-6)


def test_dpo_rewards():
  chosen, rejected = L.dpo_rewards(jnp.asarray(CHOSEN), jnp.asarray(REJECTED),
                                   jnp.asarray(REF_CHOSEN), jnp.asarray(REF_REJECTED), 0.1)
  np.testing.assert_allclose(chosen, [0.1 * (c - r) for c, r in zip(CHOSEN, REF_CHOSEN)],
                             rtol=1e-6)
  np.testing.assert_allclose(rejected, [0.1 * (c - r) for c, r in zip(REJECTED, REF_REJECTED)],
                             rtol=1e-6)


AVG_C = [-0.4, -1.3, -2.0]
AVG_R = [-0.9, -1.1, -3.5]


def test_simpo_matches_formula():
  beta, gamma, eps = 2.0, 0.6, 0.1
  got = L.simpo_loss(jnp.asarray(AVG_C), jnp.asarray(AVG_R), beta=beta, gamma=gamma,
                     label_smoothing=eps)
  z = [beta * (c - r) - gamma for c, r in zip(AVG_C, AVG_R)]
  np.testing.assert_allclose(got, [-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z],
                             rtol=1e-6)


def test_simpo_without_margin_is_reference_free_sigmoid():
  beta = 2.0
  simpo = L.simpo_loss(jnp.asarray(AVG_C), jnp.asarray(AVG_R), beta=beta, gamma=0.0)
  zeros = jnp.zeros(3)
  dpo = L.dpo_loss(jnp.asarray(AVG_C), jnp.asarray(AVG_R), zeros, zeros, beta=beta)
  np.testing.assert_allclose(simpo, dpo, rtol=1e-6)


def test_alphapo_reward_shape():
  beta, gamma, alpha = 2.0, 0.5, 0.25
  got = L.simpo_loss(jnp.asarray(AVG_C), jnp.asarray(AVG_R), beta=beta, gamma=gamma, alpha=alpha)
  r = lambda a: (1 - math.exp(a) ** -alpha) / alpha
  np.testing.assert_allclose(got, [-logsig(beta * (r(c) - r(x)) - gamma)
                                   for c, x in zip(AVG_C, AVG_R)], rtol=1e-6)


def test_orpo_matches_odds_ratio():
  lam = 0.3
  log_odds = lambda a: math.log(math.exp(a) / (1 - math.exp(a)))
  got = L.orpo_loss(jnp.asarray(AVG_C), jnp.asarray(AVG_R), lam=lam)
  np.testing.assert_allclose(got, [-lam * logsig(log_odds(c) - log_odds(r))
                                   for c, r in zip(AVG_C, AVG_R)], rtol=1e-5)


def test_orpo_is_stable_near_certainty_and_far_below():
  log_odds = lambda a: a - math.log(-math.expm1(a))  # log(p / (1 - p)), p = exp(a)
  chosen, rejected = jnp.asarray([-1e-4, -300.0, 0.0]), jnp.asarray([-2e-4, -310.0, -1.0])
  got = L.orpo_loss(chosen, rejected, lam=1.0)
  assert np.all(np.isfinite(got))
  assert float(got[0]) == pytest.approx(-logsig(log_odds(-1e-4) - log_odds(-2e-4)), rel=1e-4)
  assert float(got[1]) == pytest.approx(-logsig(10.0), rel=1e-4)
  # p = 1 exactly has infinite odds; the cap at -1e-6 keeps it finite and near that value.
  assert float(got[2]) == pytest.approx(-logsig(log_odds(-1e-6) - log_odds(-1.0)), rel=1e-3)


def test_reward_loss_with_margin_and_centering():
  r_c, r_r, margin, coef = [1.5, -0.2, 0.3], [0.5, 0.4, -1.0], [0.5, 0.0, 2.0], 0.01
  got = L.reward_loss(jnp.asarray(r_c), jnp.asarray(r_r), margin=jnp.asarray(margin),
                      center_rewards_coefficient=coef)
  expect = [-logsig(c - r - m) + coef * (c + r) ** 2 for c, r, m in zip(r_c, r_r, margin)]
  np.testing.assert_allclose(got, expect, rtol=1e-6)
  # TRL: mean BT term + coef * mean((r_c + r_r)^2); the per-pair split has the same mean.
  trl = (sum(-logsig(c - r - m) for c, r, m in zip(r_c, r_r, margin)) / 3
         + coef * sum((c + r) ** 2 for c, r in zip(r_c, r_r)) / 3)
  assert float(jnp.mean(got)) == pytest.approx(trl, rel=1e-6)
  plain = L.reward_loss(jnp.asarray(r_c), jnp.asarray(r_r))
  np.testing.assert_allclose(plain, [-logsig(c - r) for c, r in zip(r_c, r_r)], rtol=1e-6)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_gradients_finite_for_extreme_logps(loss_type):
  kwargs = dict(EXPECTED[loss_type][0])
  logps = jnp.asarray([[-1e4, -1.0, -5e3], [-1.0, -1e4, -2e3], [-3.0, -2.0, -1e4],
                       [-1e4, -1e4, -9e3]])
  lengths = jnp.asarray([300.0, 2.0, 100.0])

  def total(x):
    return jnp.sum(L.dpo_loss(*x, loss_type=loss_type, beta=0.1, chosen_lengths=lengths,
                              rejected_lengths=lengths, **kwargs))

  value, grads = jax.value_and_grad(total)(logps)
  assert np.isfinite(value) and np.all(np.isfinite(grads))


def test_other_gradients_finite_for_extreme_logps():
  a_c, a_r = jnp.asarray([-1e4, -1e-9, -3.0]), jnp.asarray([-1e-9, -1e4, -1e4])
  for fn in (lambda c, r: L.simpo_loss(c, r, beta=2.0, gamma=0.5),
             lambda c, r: L.orpo_loss(c, r, lam=0.1),
             lambda c, r: L.reward_loss(c, r, margin=1.0, center_rewards_coefficient=0.01)):
    grads = jax.grad(lambda c, r: jnp.sum(fn(c, r)), argnums=(0, 1))(a_c, a_r)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_jits_with_static_config():
  fn = jax.jit(functools.partial(L.dpo_loss, loss_type=["sigmoid", "ipo"], beta=BETA))
  arr = lambda x: jnp.asarray(x, jnp.float32)
  got = fn(arr(CHOSEN), arr(REJECTED), arr(REF_CHOSEN), arr(REF_REJECTED),
           chosen_lengths=arr(LEN_C), rejected_lengths=arr(LEN_R))
  np.testing.assert_allclose(got, call(["sigmoid", "ipo"]), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="dpo"), r"loss_type 'dpo' is unknown; use one of \('sigmoid'"),
    (dict(loss_type=[]), "loss_type is empty"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), r"'robust' and must lie in \[0, 0.5\)"),
    (dict(loss_type="sigmoid", label_smoothing=-0.1), r"'sigmoid' and must lie in \[0, 0.5\)"),
    (dict(loss_type="aot", label_smoothing=0.7), r"'aot' and must lie in \[0, 0.5\)"),
    (dict(loss_type="exo_pair"), "'exo_pair' needs label_smoothing .* recommends 1e-3"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), "'exo_pair' needs label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "has no effect on loss types"),
    (dict(loss_type="ipo", len_c=None), "'ipo' averages .* pass chosen_lengths and rejected_"),
    (dict(loss_type="sigmoid_norm", len_r=None), "'sigmoid_norm' averages"),
    (dict(loss_type="sft", len_c=None), "'sft' is a per-token NLL; pass chosen_lengths"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 entries for 2"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
    (dict(loss_type=["sigmoid", "aot"], pair_weights=jnp.ones(3)), "pair_weights cannot"),
    (dict(f_divergence_type="kl"), "f_divergence_type 'kl' is unknown"),
])
def test_dpo_validation(kwargs, match):
  kwargs = dict(kwargs)
  with pytest.raises(ConfigError, match=match):
    call(kwargs.pop("loss_type", "sigmoid"), **kwargs)


def test_other_validation():
  x = jnp.asarray(AVG_C)
  with pytest.raises(ConfigError, match="simpo_loss: beta must be > 0"):
    L.simpo_loss(x, x, beta=0.0, gamma=0.5)
  with pytest.raises(ConfigError, match=r"simpo_loss: label_smoothing .* \[0, 0.5\)"):
    L.simpo_loss(x, x, beta=2.0, gamma=0.5, label_smoothing=0.5)
  with pytest.raises(ConfigError, match="orpo_loss: lam must be >= 0"):
    L.orpo_loss(x, x, lam=-0.1)
  with pytest.raises(ConfigError, match="reward_loss: center_rewards_coefficient must be >= 0"):
    L.reward_loss(x, x, center_rewards_coefficient=-1.0)
  with pytest.raises(ConfigError, match="dpo_rewards: beta must be > 0"):
    L.dpo_rewards(x, x, x, x, 0.0)
