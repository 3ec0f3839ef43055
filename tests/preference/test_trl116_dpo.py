"""`llmjax.preference.losses` against TRL 1.16.0's own loss code, run in torch.

The reference (`trl116_dpo_reference.py`) is copied verbatim from the trl-1.16.0 wheel:
`DPOTrainer._compute_loss`'s loss part and `__init__`'s loss checks, `CPOTrainer.cpo_loss`,
`ORPOTrainer.odds_ratio_loss` and `RewardTrainer.compute_loss`'s loss. Both sides get the same
random float32 inputs; batch losses and their gradients must agree.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import trl116_dpo_reference as ref  # noqa: E402

from llmjax.errors import ConfigError  # noqa: E402
from llmjax.preference import losses as L  # noqa: E402
from llmjax.train.losses import logit_stats  # noqa: E402

SEEDS = (0, 1)
B, T, V = 5, 9, 11
RTOL = 1e-5


def batch(seed: int) -> dict[str, np.ndarray]:
  """Pairs as TRL batches them: rows [chosen..., rejected...] of prompt + completion tokens."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, 4, 2 * B)
  length = rng.integers(1, T - 3, 2 * B)
  pos = np.arange(T)[None, :]
  mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).astype(np.float32)
  # Logits (for WPO) and the logps of random targets under them, at the shifted positions.
  logits = rng.normal(0.0, 2.0, (2 * B, T - 1, V)).astype(np.float32)
  targets = rng.integers(0, V, (2 * B, T - 1))
  logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  per_token = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0] * mask[:, 1:]
  ref_per_token = (per_token + rng.normal(0.0, 0.3, per_token.shape)) * mask[:, 1:]
  return dict(mask=mask, logits=logits, per_token=per_token.astype(np.float32),
              ref_logps=ref_per_token.sum(1).astype(np.float32))


def trl_dpo(b, **cfg):
  """TRL's batch loss and d loss / d per-token logps."""
  self = ref.dpo_self(**cfg)
  per_token = torch.tensor(b["per_token"], requires_grad=True)
  logps = per_token.sum(dim=1)
  chosen, rejected = logps.chunk(2, dim=0)
  ref_c, ref_r = torch.tensor(b["ref_logps"]).chunk(2, dim=0)
  z = torch.tensor(b["logits"])
  # What TRL's fused LM head returns as log_sum_sq_probs: log sum p^2 = lse(2z) - 2 lse(z).
  outputs = SimpleNamespace(
      log_sum_sq_probs=torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
  loss = ref.dpo_loss(self, chosen, rejected, ref_c, ref_r, torch.tensor(b["mask"]), per_token,
                      outputs)
  loss.backward()
  return loss.item(), per_token.grad.numpy()


def our_dpo(b, loss_type, use_weighting=False, **cfg):
  mask = jnp.asarray(b["mask"][:, 1:])
  lengths = mask.sum(1)
  ref_c, ref_r = jnp.split(jnp.asarray(b["ref_logps"]), 2)
  weights = None
  if use_weighting:
    # Ours from the logits by the per-token helper the stages use (targets do not matter).
    stats = logit_stats(jnp.asarray(b["logits"]), jnp.zeros(mask.shape, jnp.int32),
                        sum_sq_probs=True)
    w = L.wpo_weights(jnp.asarray(b["per_token"]), stats.log_sum_sq_probs, mask)
    weights = w[:B] * w[B:]

  def f(per_token):
    chosen, rejected = jnp.split(per_token.sum(1), 2)
    return L.dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type,
                      chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
                      pair_weights=weights, **cfg).mean()
  loss, grad = jax.value_and_grad(f)(jnp.asarray(b["per_token"]))
  return float(loss), np.asarray(grad)


def check_dpo(loss_type, seeds=SEEDS, **cfg):
  for seed in seeds:
    b = batch(seed)
    want, want_grad = trl_dpo(b, loss_type=loss_type, **cfg)
    got, got_grad = our_dpo(b, loss_type, **cfg)
    assert got == pytest.approx(want, rel=RTOL, abs=1e-7), seed
    # Only completion tokens have logps (0 elsewhere, where TRL's sft does not look).
    on = b["mask"][:, 1:]
    np.testing.assert_allclose(got_grad * on, want_grad * on, rtol=RTOL, atol=1e-7,
                               err_msg=str(seed))


# label_smoothing where a type uses it (TRL's sigmoid ignores it: see the module docstring).
SMOOTHING = {"robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "exo_pair": 1e-3}


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
  check_dpo([loss_type], beta=0.5, label_smoothing=SMOOTHING.get(loss_type, 0.0))


def test_weighted_combination_and_wpo_match_trl():
  check_dpo(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.2)
  check_dpo(["sigmoid", "ipo"], beta=0.3, use_weighting=True)


@pytest.mark.parametrize("f_div, coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                         ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
                                         ("alpha_divergence", 1.7)])
def test_f_divergences_match_trl(f_div, coef):
  # ipo and sigmoid_norm divide the scores by lengths, so f'(t)'s constants (1.16) count.
  # One seed per type (in turn), to keep the matrix fast.
  for i, loss_type in enumerate(L.F_DIVERGENCE_LOSS_TYPES):
    check_dpo([loss_type], seeds=(SEEDS[i % len(SEEDS)],), beta=0.5, f_divergence_type=f_div,
              f_alpha_divergence_coef=coef, label_smoothing=SMOOTHING.get(loss_type, 0.0))


def test_rejected_settings_match_trl():
  # TRL 1.16 rejects a non-default f-divergence for the types it does not apply to, and WPO
  # weights on the sorting aot types; these raise ConfigError here.
  b = batch(0)
  for loss_type in set(L.LOSS_TYPES) - set(L.F_DIVERGENCE_LOSS_TYPES):
    with pytest.raises(ValueError, match="only supported"):
      ref.dpo_self([loss_type], f_divergence_type="forward_kl",
                   label_smoothing=SMOOTHING.get(loss_type, 0.0))
    with pytest.raises(ConfigError, match="f_divergence_type='forward_kl' applies only"):
      our_dpo(b, loss_type, f_divergence_type="forward_kl",
              label_smoothing=SMOOTHING.get(loss_type, 0.0))
  for loss_type in ("aot", "aot_unpaired"):
    with pytest.raises(NotImplementedError):
      ref.dpo_self([loss_type], use_weighting=True)
    with pytest.raises(ConfigError, match="pair_weights cannot be used"):
      our_dpo(b, loss_type, use_weighting=True)
  with pytest.raises(ValueError, match="Label smoothing must be greater"):
    ref.dpo_self(["exo_pair"])
  with pytest.raises(ConfigError, match="exo_pair"):
    our_dpo(b, "exo_pair")


def avg_logps(seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return tuple(-rng.uniform(0.01, 4.0, (2, 16)).astype(np.float32))


@pytest.mark.parametrize("gamma, eps, alpha", [(0.5, 0.0, 0.0), (1.0, 0.1, 0.0),
                                               (0.5, 0.0, 0.25), (0.0, 0.0, -0.5)])
def test_simpo_matches_trl_cpo(gamma, eps, alpha):
  beta = 2.0
  for seed in SEEDS:
    a_c, a_r = avg_logps(seed)
    cpo = ref.CPOLoss("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps, alpha=alpha)
    want = cpo.cpo_loss(torch.tensor(a_c), torch.tensor(a_r))[0].numpy()
    got = L.simpo_loss(jnp.asarray(a_c), jnp.asarray(a_r), beta=beta, gamma=gamma,
                       label_smoothing=eps, alpha=alpha)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)


def test_orpo_matches_trl():
  for seed in SEEDS:
    a_c, a_r = avg_logps(seed)
    want = ref.ORPOLoss(beta=0.1).odds_ratio_loss(torch.tensor(a_c), torch.tensor(a_r))[0]
    got = L.orpo_loss(jnp.asarray(a_c), jnp.asarray(a_r), lam=0.1)
    # TRL's term is beta * log sig(log odds), which its trainer subtracts from the NLL.
    np.testing.assert_allclose(got, -want.numpy(), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_matches_trl(margin, center):
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    r_c, r_r, m = rng.normal(0.0, 2.0, (3, 16)).astype(np.float32)
    inputs = {"margin": torch.tensor(m)} if margin else {}
    want = ref.reward_loss(torch.tensor(r_c), torch.tensor(r_r), inputs, center).item()
    got = L.reward_loss(jnp.asarray(r_c), jnp.asarray(r_r), margin=m if margin else None,
                        center_rewards_coefficient=center).mean()
    assert float(got) == pytest.approx(want, rel=RTOL)


def test_f_divergence_scores_keep_constants():
  # f'(t) at t = 1 (u = 0): forward_kl 1 - 1/t = 0, js log(2t / (1 + t)) = 0, alpha 0.
  zero = jnp.zeros(1)
  for f_div in L.F_DIVERGENCE_TYPES:
    s_c, _ = L.f_divergence_scores(zero, zero, f_div, 0.5)
    assert float(s_c[0]) == pytest.approx(0.0, abs=1e-7), f_div
  s_c, _ = L.f_divergence_scores(jnp.asarray([math.log(3.0)]), zero, "js_divergence")
  assert float(s_c[0]) == pytest.approx(math.log(2 * 3 / 4), rel=1e-6)
