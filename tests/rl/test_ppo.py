"""The PPO math against (a) the papers' formulas as plain numpy loops and (b) TRL's own code.

(b) is TRL v1.9.0's `trl/experimental/ppo/ppo_trainer.py` (TRL 1.16 no longer ships the PPO
trainer), copied verbatim below and run in torch on random inputs: equal where `llmjax.rl.ppo`
follows TRL, and pinned where it deliberately differs (the score's position).
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.rl import ppo
from llmjax.rl.policy_loss import k3_kl

try:
  import torch
except ImportError:  # the numpy references below still run
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="TRL's reference code needs torch")

T = 8
# Index of each row's last real token (TRL's `sequence_lengths`) and whether it is an EOS: rows
# that stop early end on EOS and are padded after it; a row without EOS fills the buffer.
LAST = np.array([2, 5, T - 1, T - 1, 0, 4])
EOS = np.array([True, True, True, False, True, True])
ROWS = len(LAST)

# The functions compiled, settings that pick python branches static: one compile per setting
# costs a fraction of jax's op-by-op dispatch on CPU. (They are jit-able; ConfigError tests and
# the traced-kl_coef test call them as they are.)
J = types.SimpleNamespace(
    gae=jax.jit(ppo.gae),
    token_rewards=jax.jit(ppo.token_rewards, static_argnames=("missing_eos_penalty", "whiten")),
    kl_penalty=jax.jit(ppo.kl_penalty, static_argnames=("kind",)),
    masked_whiten=jax.jit(ppo.masked_whiten, static_argnames=("shift_mean",)),
    masked_mean=jax.jit(ppo.masked_mean, static_argnames=("axis",)),
    masked_var=jax.jit(ppo.masked_var, static_argnames=("unbiased",)),
    ppo_policy_loss=jax.jit(ppo.ppo_policy_loss, static_argnames=("cliprange", "entropy_coef")),
    ppo_value_loss=jax.jit(ppo.ppo_value_loss, static_argnames=("cliprange_value",)),
    token_entropy=jax.jit(ppo.token_entropy),
    explained_variance=jax.jit(ppo.explained_variance),
)


def mask_of(last):
  return (np.arange(T)[None, :] <= np.asarray(last)[:, None]).astype(np.float64)


def random_inputs(seed, last=LAST):
  rng = np.random.default_rng(seed)
  rows = len(last)
  return types.SimpleNamespace(
      logps=rng.normal(-2.0, 0.8, (rows, T)), ref=rng.normal(-2.0, 0.8, (rows, T)),
      values=rng.normal(0.0, 1.0, (rows, T)), scores=rng.normal(0.0, 2.0, rows),
      mask=mask_of(last))


# ---------------------------------------------------------------------------------------------
# (a) The papers' formulas, plain python/numpy.

def ref_token_rewards(scores, kl, mask, kl_coef, eos=None, penalty=None):
  """r_t = -kl_coef kl_t on real tokens, plus the (penalised) score on the last real token."""
  out = np.zeros_like(kl)
  for i in range(kl.shape[0]):
    real = [t for t in range(kl.shape[1]) if mask[i, t]]
    for t in real:
      out[i, t] = -kl_coef * kl[i, t]
    if real:
      out[i, real[-1]] += scores[i] - (penalty if penalty is not None and not eos[i] else 0.0)
  return out


def ref_gae(rewards, values, mask, gamma, lam):
  """Schulman et al. 2016: A_t = sum_l (gamma lam)^l delta_{t+l}, over a row's real tokens
  (masked-out positions deleted), V after the last real token = 0; returns = A + V."""
  adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if mask[i, t]]
    r = [rewards[i, t] for t in idx]
    v = [values[i, t] for t in idx] + [0.0]
    delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
    for k, t in enumerate(idx):
      adv[i, t] = sum((gamma * lam) ** l * delta[k + l] for l in range(len(idx) - k))
      ret[i, t] = adv[i, t] + v[k]
  return adv, ret


def ref_whiten(x, mask, shift_mean=True):
  sel = x[mask > 0]
  mean, var = sel.mean(), sel.var(ddof=1)
  out = (x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  return np.where(mask > 0, out, 0.0)


def ref_policy_loss(logps, old, adv, mask, eps):
  """PPO Eq. (7), negated: mean over real tokens of -min(r A, clip(r, 1 - eps, 1 + eps) A)."""
  terms = []
  for i, t in zip(*np.nonzero(mask)):
    r = math.exp(logps[i, t] - old[i, t])
    terms.append(-min(r * adv[i, t], min(max(r, 1 - eps), 1 + eps) * adv[i, t]))
  return sum(terms) / len(terms)


def ref_value_loss(v, old, ret, mask, c):
  terms = [max((v[i, t] - ret[i, t]) ** 2,
               (min(max(v[i, t], old[i, t] - c), old[i, t] + c) - ret[i, t]) ** 2)
           for i, t in zip(*np.nonzero(mask))]
  return 0.5 * sum(terms) / len(terms)


def close(got, want, tol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ppo.KL_KINDS)
def test_kl_penalty_formulas(kind):
  x = random_inputs(0)
  got = np.asarray(J.kl_penalty(jnp.array(x.logps), jnp.array(x.ref), kind))
  d = x.logps - x.ref
  want = {"k1": d, "k2": d ** 2 / 2, "k3": np.exp(-d) + d - 1}[kind]
  close(got, want)
  if kind == "k3":  # reused, not re-derived
    close(got, k3_kl(jnp.array(x.logps), jnp.array(x.ref)))


@pytest.mark.parametrize("penalty", [None, 1.5])
def test_token_rewards_formula(penalty):
  x = random_inputs(1)
  kl = x.logps - x.ref
  got = J.token_rewards(jnp.array(x.scores), jnp.array(kl), jnp.array(x.mask), kl_coef=0.1,
                          eos_seen=jnp.array(EOS), missing_eos_penalty=penalty)
  want = ref_token_rewards(x.scores, kl, x.mask, 0.1, EOS, penalty)
  close(got, want)
  # The score sits on the last real token (the EOS), never on the padding after it.
  row = 0
  assert float(got[row, LAST[row]]) == pytest.approx(-0.1 * kl[row, LAST[row]] + x.scores[row],
                                                      rel=1e-5)
  assert np.all(np.asarray(got)[x.mask == 0] == 0)


def test_token_rewards_whitening_rescales_without_centring():
  x = random_inputs(2)
  kl = x.logps - x.ref
  got = J.token_rewards(jnp.array(x.scores), jnp.array(kl), jnp.array(x.mask), kl_coef=0.1,
                          whiten=True)
  close(got, ref_whiten(ref_token_rewards(x.scores, kl, x.mask, 0.1), x.mask, shift_mean=False))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_formula(gamma, lam):
  x = random_inputs(3)
  rewards = np.random.default_rng(4).normal(size=(ROWS, T))
  adv, ret = J.gae(jnp.array(rewards), jnp.array(x.values), jnp.array(x.mask), gamma=gamma,
                     lam=lam)
  want_adv, want_ret = ref_gae(rewards, x.values, x.mask, gamma, lam)
  close(adv, want_adv)
  close(ret, want_ret)


def test_gae_without_discount_or_kl_is_score_minus_value():
  x = random_inputs(5)
  rewards = J.token_rewards(jnp.array(x.scores), jnp.zeros((ROWS, T)), jnp.array(x.mask),
                              kl_coef=0.0)
  adv, ret = J.gae(rewards, jnp.array(x.values), jnp.array(x.mask), gamma=1.0, lam=1.0)
  close(adv, (x.scores[:, None] - x.values) * x.mask)
  close(ret, x.scores[:, None] * x.mask)


def test_padding_is_ignored():
  x = random_inputs(6)
  rewards = np.random.default_rng(7).normal(size=(ROWS, T))
  junk = np.where(x.mask > 0, 0.0, np.nan)  # NaN everywhere outside the completions
  adv, ret = J.gae(jnp.array(rewards), jnp.array(x.values), jnp.array(x.mask), gamma=0.9,
                     lam=0.7)
  adv2, ret2 = J.gae(jnp.array(rewards + junk), jnp.array(x.values + junk), jnp.array(x.mask),
                       gamma=0.9, lam=0.7)
  close(adv2, adv, 0)
  close(ret2, ret, 0)
  got = J.token_rewards(jnp.array(x.scores), jnp.array(x.logps + junk), jnp.array(x.mask))
  close(got, J.token_rewards(jnp.array(x.scores), jnp.array(x.logps), jnp.array(x.mask)), 0)

  # The losses: same values and the same (finite) gradients with garbage in the padding.
  big = np.where(x.mask > 0, 0.0, 1e4)
  old = x.logps + np.random.default_rng(8).normal(0, 0.3, (ROWS, T))

  def losses(logps, values, pad):
    # exp(logp - old_logp) overflows on this padding unless the function masks it first.
    pg = J.ppo_policy_loss(logps + pad, jnp.array(old) - pad, jnp.array(x.values) + pad,
                           jnp.array(x.mask))[0]
    vf = J.ppo_value_loss(values + pad, jnp.array(x.values) - pad,
                          jnp.array(x.scores[:, None]) + pad, jnp.array(x.mask))[0]
    return pg + vf

  grad = jax.jit(jax.value_and_grad(losses, argnums=(0, 1)))
  clean = grad(jnp.array(x.logps), jnp.array(x.values), jnp.zeros((ROWS, T)))
  dirty = grad(jnp.array(x.logps), jnp.array(x.values), jnp.array(big))
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
    close(b, a, 0)
    assert np.all(np.isfinite(np.asarray(b)))


def test_gae_skips_interior_holes():
  # Documented: any 0/1 mask gives the GAE of the row with its masked-out positions deleted.
  x = random_inputs(9)
  rewards = np.random.default_rng(10).normal(size=(ROWS, T))
  mask = x.mask.copy()
  mask[1, 2] = mask[1, 3] = mask[2, 0] = 0.0
  adv, ret = J.gae(jnp.array(rewards), jnp.array(x.values), jnp.array(mask), gamma=0.95,
                     lam=0.9)
  want_adv, want_ret = ref_gae(rewards, x.values, mask, 0.95, 0.9)
  close(adv, want_adv)
  close(ret, want_ret)


def test_masked_moments_and_whiten():
  x = random_inputs(11)
  sel = x.values[x.mask > 0]
  assert float(J.masked_mean(jnp.array(x.values), jnp.array(x.mask))) == pytest.approx(
      sel.mean(), rel=1e-5)
  close(J.masked_mean(jnp.array(x.values), jnp.array(x.mask), axis=1),
        (x.values * x.mask).sum(1) / x.mask.sum(1))
  assert float(J.masked_var(jnp.array(x.values), jnp.array(x.mask))) == pytest.approx(
      sel.var(ddof=1), rel=1e-5)
  assert float(J.masked_var(jnp.array(x.values), jnp.array(x.mask), unbiased=False)) == (
      pytest.approx(sel.var(), rel=1e-5))
  for shift in (True, False):
    close(J.masked_whiten(jnp.array(x.values), jnp.array(x.mask), shift_mean=shift),
          ref_whiten(x.values, x.mask, shift))
  # Degenerate masks stay finite: one real element whitens to 0, none gives 0.
  one = np.zeros((2, T))
  one[0, 3] = 1
  assert np.all(np.asarray(J.masked_whiten(jnp.array(x.values[:2]), jnp.array(one))) == 0)
  assert float(J.masked_mean(jnp.ones((2, T)), jnp.zeros((2, T)))) == 0.0


def test_policy_and_value_losses_formula():
  x = random_inputs(12)
  rng = np.random.default_rng(13)
  old = x.logps + rng.normal(0, 0.4, (ROWS, T))  # plenty of ratios outside [0.8, 1.2]
  adv = rng.normal(size=(ROWS, T))
  loss, m = J.ppo_policy_loss(jnp.array(x.logps), jnp.array(old), jnp.array(adv),
                                jnp.array(x.mask), cliprange=0.2)
  assert float(loss) == pytest.approx(ref_policy_loss(x.logps, old, adv, x.mask, 0.2), rel=1e-5)
  d, real = (x.logps - old)[x.mask > 0], x.mask > 0
  r = np.exp(d)
  assert float(m["approxkl"]) == pytest.approx(0.5 * np.mean(d ** 2), rel=1e-5)
  assert float(m["ratio_mean"]) == pytest.approx(r.mean(), rel=1e-5)
  assert float(m["ratio_max"]) == pytest.approx(r.max(), rel=1e-5)
  assert float(m["ratio_min"]) == pytest.approx(r.min(), rel=1e-5)
  a = adv[real]
  clipped = ((r > 1.2) & (a > 0)) | ((r < 0.8) & (a < 0))
  assert 0 < clipped.sum() < len(r)
  assert float(m["clipfrac"]) == pytest.approx(clipped.mean(), rel=1e-5)

  old_v = x.values + rng.normal(0, 0.5, (ROWS, T))
  ret = rng.normal(size=(ROWS, T))
  vloss, vm = J.ppo_value_loss(jnp.array(x.values), jnp.array(old_v), jnp.array(ret),
                                 jnp.array(x.mask), cliprange_value=0.2)
  assert float(vloss) == pytest.approx(ref_value_loss(x.values, old_v, ret, x.mask, 0.2),
                                       rel=1e-5)
  unclip = (x.values - ret) ** 2
  clip = (np.clip(x.values, old_v - 0.2, old_v + 0.2) - ret) ** 2
  assert 0 < float(vm["vf_clipfrac"]) < 1
  assert float(vm["vf_clipfrac"]) == pytest.approx((clip > unclip)[real].mean(), rel=1e-5)
  # Without clipping: half the mean squared error.
  plain = J.ppo_value_loss(jnp.array(x.values), jnp.array(old_v), jnp.array(ret),
                             jnp.array(x.mask), cliprange_value=None)[0]
  assert float(plain) == pytest.approx(0.5 * unclip[real].mean(), rel=1e-5)


@pytest.mark.parametrize("ratio,adv,zero", [
    (1.5, 1.0, True),     # above 1 + eps, A > 0: clipped, no gradient
    (0.5, -1.0, True),    # below 1 - eps, A < 0: clipped, no gradient
    (1.5, -1.0, False),   # above the range with A < 0: the unclipped (worse) term wins
    (0.5, 1.0, False),    # below the range with A > 0: likewise
    (1.1, 1.0, False),    # inside the range
])
def test_clip_stops_gradient(ratio, adv, zero):
  old = jnp.array([[-1.0, -1.0]])
  mask = jnp.array([[1.0, 0.0]])

  def f(logps):
    return J.ppo_policy_loss(logps, old, jnp.full((1, 2), adv), mask, cliprange=0.2)[0]

  g = jax.grad(f)(old + jnp.log(jnp.array([[ratio, 1.0]])))
  # Unclipped: d(-A r)/dlogp = -A r.
  assert float(g[0, 0]) == pytest.approx(0.0 if zero else -adv * ratio, rel=1e-5)
  assert float(g[0, 1]) == 0.0


def test_value_clip_stops_gradient():
  # V_old = 0, return 1, c = 0.2. V = 0.5 moved towards the return past the clip: the clipped
  # error (0.2 - 1)^2 is the larger, a constant: no gradient. V = -0.5 moved away: the
  # unclipped error is the larger and trains it; V = 0.1 is inside: d(0.5 (V - R)^2) = V - R.
  old, ret, mask = jnp.array([[0.0]]), jnp.array([[1.0]]), jnp.ones((1, 1))
  g = jax.grad(lambda v: J.ppo_value_loss(v, old, ret, mask, cliprange_value=0.2)[0])
  assert float(g(jnp.array([[0.5]]))[0, 0]) == 0.0
  assert float(g(jnp.array([[-0.5]]))[0, 0]) == pytest.approx(-1.5, rel=1e-5)
  assert float(g(jnp.array([[0.1]]))[0, 0]) == pytest.approx(-0.9, rel=1e-5)


def test_entropy_bonus():
  rng = np.random.default_rng(14)
  logits = rng.normal(size=(2, 3, 5))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  close(J.token_entropy(jnp.array(logits)), ent)
  mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  z = jnp.zeros((2, 3))
  base, m0 = J.ppo_policy_loss(z, z, jnp.ones((2, 3)), jnp.array(mask))
  bonus, m = J.ppo_policy_loss(z, z, jnp.ones((2, 3)), jnp.array(mask),
                                 entropies=jnp.array(ent), entropy_coef=0.01)
  assert "entropy" not in m0
  assert float(m["entropy"]) == pytest.approx(ent[mask > 0].mean(), rel=1e-5)
  assert float(bonus) == pytest.approx(float(base) - 0.01 * ent[mask > 0].mean(), rel=1e-5)


def test_explained_variance():
  x = random_inputs(15)
  ret = x.values + np.random.default_rng(16).normal(0, 0.5, (ROWS, T))
  real = x.mask > 0
  want = 1 - np.var((ret - x.values)[real]) / np.var(ret[real])
  got = J.explained_variance(jnp.array(x.values), jnp.array(ret), jnp.array(x.mask))
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(J.explained_variance(jnp.array(ret), jnp.array(ret), jnp.array(x.mask))) == 1.0
  assert np.isnan(float(J.explained_variance(z := jnp.ones((1, 2)), z, z)))


def test_adaptive_kl():
  def want(coef, kl, n, target, horizon):  # Ziegler et al. 2019 / TRL's AdaptiveKLController
    return coef * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)

  for kl in (7.0, 5.0, 100.0, 0.0):
    got = float(ppo.adaptive_kl_update(0.1, kl, 256, target=6.0, horizon=10000.0))
    assert got == pytest.approx(want(0.1, kl, 256, 6.0, 10000.0), rel=1e-6)
  assert float(ppo.adaptive_kl_update(0.1, 7.0, 256, target=6.0, horizon=1e4)) > 0.1
  assert float(ppo.adaptive_kl_update(0.1, 5.0, 256, target=6.0, horizon=1e4)) < 0.1
  # The error is clipped at +-0.2.
  assert float(ppo.adaptive_kl_update(1.0, 1e3, 100, target=1.0, horizon=100.0)) == (
      pytest.approx(1.2))
  # It runs under jit with a traced coefficient, and token_rewards accepts that coefficient.
  coef = jax.jit(lambda c, k: ppo.adaptive_kl_update(c, k, 8, target=6.0, horizon=80.0))(
      jnp.float32(0.1), jnp.float32(12.0))
  assert float(coef) == pytest.approx(0.102, rel=1e-6)
  r = jax.jit(lambda c: ppo.token_rewards(jnp.ones(1), jnp.ones((1, 2)), jnp.ones((1, 2)),
                                          kl_coef=c))(coef)
  close(r, [[-0.102, 1 - 0.102]])


@pytest.mark.parametrize("call,match", [
    (lambda: ppo.kl_penalty(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4"), "kind"),
    (lambda: ppo.gae(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), lam=1.5), "lam"),
    (lambda: ppo.gae(jnp.zeros((1, 3)), jnp.zeros((1, 2)), jnp.ones((1, 2))), "rewards"),
    (lambda: ppo.token_rewards(jnp.zeros(2), jnp.zeros((1, 2)), jnp.ones((1, 2))), "scores"),
    (lambda: ppo.token_rewards(jnp.zeros(1), jnp.zeros((1, 2)), jnp.ones((1, 2)),
                               missing_eos_penalty=1.0), "eos_seen"),
    (lambda: ppo.token_rewards(jnp.zeros(1), jnp.zeros((1, 2)), jnp.ones((1, 2)),
                               kl_coef=-0.1), "kl_coef"),
    (lambda: ppo.ppo_policy_loss(*[jnp.zeros((1, 2))] * 4, cliprange=1.5), "cliprange"),
    (lambda: ppo.ppo_policy_loss(*[jnp.zeros((1, 2))] * 4, entropy_coef=0.1), "entropies"),
    (lambda: ppo.ppo_value_loss(*[jnp.zeros((1, 2))] * 4, cliprange_value=0.0),
     "cliprange_value"),
    (lambda: ppo.adaptive_kl_update(0.1, 1.0, 1, target=0.0, horizon=1.0), "target"),
])
def test_config_errors(call, match):
  with pytest.raises(ConfigError, match=match):
    call()


# ---------------------------------------------------------------------------------------------
# (b) TRL v1.9.0, trl/experimental/ppo/ppo_trainer.py, verbatim (4-space indented and lines as
# long as there).

INVALID_LOGPROB = 1.0


def masked_mean(values, mask, axis=None):
    """Compute mean of tensor with a masked values."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    """Compute variance of tensor with masked values."""
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """Whiten values with masked values."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_rewards_and_advantages(self, args, responses, postprocessed_responses, logprobs,
                               ref_logprobs, values, scores, sequence_lengths):
    """`PPOTrainer.train`, from "Response Processing 3" to the advantage whitening."""
    # Response Processing 3. Filter completion. Ensure that the sample contains stop_token_id
    # Completions not passing that filter will receive a lower score.
    contain_eos_token = torch.any(postprocessed_responses == self.processing_class.eos_token_id, dim=-1)
    if self.args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= self.args.missing_eos_penalty
    # accelerator.print(f"{scores=}, {(contain_eos_token.sum() / len(contain_eos_token))=}")

    # be very careful with `padding_mask_p1`; see https://excalidraw.com/#json=LWnzG4w2k5DjF_EOL_xPt,e2w3a-hFJ_gX5vOfeyXGTw
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    # 4. compute rewards
    # Formula used by http://joschu.net/blog/kl-approx.html for the k1 and k3 estimators
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    # 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    # 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return types.SimpleNamespace(kl=kl, rewards=rewards, values=values, returns=returns,
                                 advantages=advantages, padding_mask=padding_mask,
                                 padding_mask_p1=padding_mask_p1)


def trl_losses(args, vpred, mb_values, mb_return, padding_mask_p1, new_logprobs, mb_logprobs,
               mb_advantage, padding_mask, logits, micro_batch_inds):
    """`PPOTrainer.train`'s micro-batch step, less the forward pass and the optimiser."""
    vpredclipped = torch.clamp(
        vpred,
        mb_values - args.cliprange_value,
        mb_values + args.cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])
    vf_clipfrac = masked_mean(
        (vf_losses2 > vf_losses1).float(), ~padding_mask_p1[micro_batch_inds]
    )
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])
    pg_clipfrac = masked_mean(
        (pg_losses2 > pg_losses).float(), ~padding_mask[micro_batch_inds]
    )
    prob_dist = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_loss=pg_loss,
                pg_clipfrac=pg_clipfrac, entropy=entropy, approxkl=approxkl)


# ---------------------------------------------------------------------------------------------

EOS_ID, PAD_ID = 2, 0


def run_trl(x, last, eos, *, kl_estimator="k1", kl_coef=0.05, gamma=1.0, lam=0.95,
            whiten_rewards=False, missing_eos_penalty=None):
  """TRL's step on our inputs: tokens laid out as TRL's truncate_response leaves them."""
  args = types.SimpleNamespace(kl_estimator=kl_estimator, kl_coef=kl_coef, gamma=gamma, lam=lam,
                               whiten_rewards=whiten_rewards,
                               missing_eos_penalty=missing_eos_penalty)
  trainer = types.SimpleNamespace(args=args,
                                  processing_class=types.SimpleNamespace(eos_token_id=EOS_ID))
  tokens = np.full((len(last), T), 5)
  for i, (l, e) in enumerate(zip(last, eos)):
    tokens[i, l + 1:] = PAD_ID
    if e:
      tokens[i, l] = EOS_ID
  f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
  return trl_rewards_and_advantages(trainer, args, torch.tensor(tokens), torch.tensor(tokens),
                                    f(x.logps), f(x.ref), f(x.values), f(x.scores),
                                    torch.tensor(np.asarray(last)))


def run_ours(x, eos, *, kl_estimator="k1", kl_coef=0.05, gamma=1.0, lam=0.95,
             whiten_rewards=False, missing_eos_penalty=None):
  kl = J.kl_penalty(jnp.array(x.logps), jnp.array(x.ref), kl_estimator)
  rewards = J.token_rewards(jnp.array(x.scores), kl, jnp.array(x.mask), kl_coef=kl_coef,
                              eos_seen=jnp.array(eos), missing_eos_penalty=missing_eos_penalty,
                              whiten=whiten_rewards)
  adv, ret = J.gae(rewards, jnp.array(x.values), jnp.array(x.mask), gamma=gamma, lam=lam)
  return types.SimpleNamespace(rewards=rewards, advantages=adv, returns=ret,
                               whitened=J.masked_whiten(adv, jnp.array(x.mask)))


@needs_torch
@pytest.mark.parametrize("kind,whiten,gamma,lam", [("k1", False, 1.0, 0.95),
                                                   ("k3", True, 0.9, 0.8)])
def test_equals_trl_on_completions_filling_the_buffer(kind, whiten, gamma, lam):
  # With no padding TRL puts the score on the last token too: everything must agree.
  last, eos = np.full(5, T - 1), np.array([True, False, True, False, False])
  x = random_inputs(20, last)
  kw = dict(kl_estimator=kind, kl_coef=0.1, gamma=gamma, lam=lam, whiten_rewards=whiten,
            missing_eos_penalty=1.0)
  trl, ours = run_trl(x, last, eos, **kw), run_ours(x, eos, **kw)
  close(ours.rewards, trl.rewards.numpy())
  close(ours.returns, trl.returns.numpy())
  close(ours.whitened, trl.advantages.numpy())


@needs_torch
def test_equals_trl_with_padding_when_gamma_lam_are_one():
  # gamma = lam = 1: the telescoping sum makes TRL's extra step after the EOS cancel, so the
  # advantages (raw and whitened) and returns on the real tokens agree despite the score's
  # different position.
  x = random_inputs(21)
  trl, ours = run_trl(x, LAST, EOS, lam=1.0), run_ours(x, EOS, lam=1.0)
  real = x.mask > 0
  raw_trl = (trl.returns - trl.values).numpy()
  close(np.asarray(ours.advantages)[real], raw_trl[real])
  close(np.asarray(ours.returns)[real], trl.returns.numpy()[real])
  close(ours.whitened, trl.advantages.numpy())


@needs_torch
def test_score_position_differs_from_trl():
  # The documented difference: TRL adds the score one position after the EOS, when it exists.
  x = random_inputs(22)
  gamma, lam, coef = 1.0, 0.95, 0.05
  trl, ours = run_trl(x, LAST, EOS, gamma=gamma, lam=lam), run_ours(x, EOS, gamma=gamma, lam=lam)
  kl = x.logps - x.ref
  for i, l in enumerate(LAST):
    if l + 1 < T:
      assert float(trl.rewards[i, l + 1]) == pytest.approx(x.scores[i], rel=1e-5)
      assert float(ours.rewards[i, l]) == pytest.approx(-coef * kl[i, l] + x.scores[i], rel=1e-5)
      # EOS advantage. Ours: r_L + score - V_L. TRL's bootstraps from V_{L+1}, the value head's
      # guess for the state after the episode ended:
      #   r_L - V_L + gamma lam score + gamma (1 - lam) V_{L+1}.
      r_l, v_l, v_next = -coef * kl[i, l], x.values[i, l], x.values[i, l + 1]
      ours_l = float(ours.advantages[i, l])
      trl_l = float((trl.returns - trl.values)[i, l])
      assert ours_l == pytest.approx(r_l + x.scores[i] - v_l, rel=1e-5, abs=1e-5)
      assert trl_l == pytest.approx(
          r_l - v_l + gamma * lam * x.scores[i] + gamma * (1 - lam) * v_next, rel=1e-5, abs=1e-5)
      assert abs(ours_l - trl_l) > 1e-3
    else:  # a completion filling the buffer: TRL's score is on its last token as well
      close(ours.rewards[i], trl.rewards[i].numpy())
      close(ours.returns[i], trl.returns[i].numpy())


@needs_torch
def test_whiten_and_losses_equal_trl():
  x = random_inputs(23)
  rng = np.random.default_rng(24)
  f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
  mask = torch.tensor(x.mask > 0)
  for shift in (True, False):
    trl_w = torch.masked_fill(masked_whiten(f(x.values), mask, shift), ~mask, 0).numpy()
    close(J.masked_whiten(jnp.array(x.values), jnp.array(x.mask), shift_mean=shift), trl_w)
  assert float(J.masked_var(jnp.array(x.values), jnp.array(x.mask))) == pytest.approx(
      float(masked_var(f(x.values), mask)), rel=1e-5)

  # The update step on TRL's own masks: the policy loss on ~padding_mask (the real tokens), the
  # value loss on ~padding_mask_p1 (one position more: TRL's, passed to ours as the mask).
  idx = torch.arange(T).repeat(ROWS, 1)
  seq = torch.tensor(LAST)
  padding_mask, padding_mask_p1 = idx > seq[:, None], idx > (seq + 1)[:, None]
  old = x.logps + rng.normal(0, 0.4, (ROWS, T))
  adv = rng.normal(size=(ROWS, T))
  old_v = x.values + rng.normal(0, 0.5, (ROWS, T))
  ret = rng.normal(size=(ROWS, T))
  logits = rng.normal(size=(ROWS, T, 11))
  args = types.SimpleNamespace(cliprange=0.2, cliprange_value=0.2)
  new_t = torch.masked_fill(f(x.logps), padding_mask, INVALID_LOGPROB)
  old_t = torch.masked_fill(f(old), padding_mask, INVALID_LOGPROB)
  vpred = torch.masked_fill(f(x.values), padding_mask_p1, 0)
  trl = trl_losses(args, vpred, f(old_v), f(ret), padding_mask_p1, new_t, old_t,
                   torch.masked_fill(f(adv), padding_mask, 0), padding_mask, f(logits),
                   torch.arange(ROWS))
  pmask, vmask = (~padding_mask).float().numpy(), (~padding_mask_p1).float().numpy()
  loss, m = J.ppo_policy_loss(jnp.array(x.logps), jnp.array(old), jnp.array(adv),
                                jnp.array(pmask), cliprange=0.2)
  vloss, vm = J.ppo_value_loss(jnp.array(x.values), jnp.array(old_v), jnp.array(ret),
                                 jnp.array(vmask), cliprange_value=0.2)
  assert float(loss) == pytest.approx(float(trl["pg_loss"]), rel=1e-5)
  assert float(m["clipfrac"]) == pytest.approx(float(trl["pg_clipfrac"]), rel=1e-5)
  assert float(vloss) == pytest.approx(float(trl["vf_loss"]), rel=1e-5)
  assert float(vm["vf_clipfrac"]) == pytest.approx(float(trl["vf_clipfrac"]), rel=1e-5)
  close(J.token_entropy(jnp.array(logits)), trl["entropy"].numpy())
  # Documented difference: TRL's approxkl averages over the padded tensor (padding adds 0).
  assert float(m["approxkl"]) * pmask.sum() / pmask.size == pytest.approx(
      float(trl["approxkl"]), rel=1e-5)
  assert float(m["approxkl"]) > float(trl["approxkl"]) * 1.1
