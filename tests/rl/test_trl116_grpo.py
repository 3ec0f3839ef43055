"""`llmjax.rl.policy_loss` and `llmjax.rl.advantages` against TRL 1.16.0's own code, run in torch.

The reference (`trl116_grpo_reference.py`) is TRL's `GRPOTrainer._compute_loss`, its advantage
blocks and `nanstd`/`nanmin`/`nanmax`, copied verbatim from the trl-1.16.0 wheel. Both sides
get the same random float32 inputs; losses, gradients and logged metrics must agree.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import trl116_grpo_reference as ref  # noqa: E402

from llmjax.errors import ConfigError  # noqa: E402
from llmjax.rl import advantages as A  # noqa: E402
from llmjax.rl import policy_loss as P  # noqa: E402

SEEDS = (0, 1)
N, T = 6, 7
MAX_LEN = 9
RTOL = 1e-5


@dataclasses.dataclass
class Batch:
  logps: np.ndarray
  old: np.ndarray
  ref: np.ndarray
  mask: np.ndarray
  adv: np.ndarray
  ent: np.ndarray


def batch(seed: int) -> Batch:
  rng = np.random.default_rng(seed)
  f32 = lambda x: np.asarray(x, np.float32)
  logps = f32(-rng.exponential(1.0, (N, T)))
  # Log-ratios of +-0.3 put many tokens (and GSPO sequences) past the clip range either way.
  old = f32(logps + rng.normal(0.0, 0.3, (N, T)))
  ref_logps = f32(logps + rng.normal(0.0, 0.3, (N, T)))
  lengths = rng.integers(1, T + 1, N)
  lengths[seed % N] = 0  # an empty completion: TRL nan-skips it in low_min / high_max
  mask = f32(np.arange(T)[None, :] < lengths[:, None])
  adv = f32(rng.normal(0.0, 1.0, N))
  adv[(seed + 1) % N] = 0.0
  return Batch(logps, old, ref_logps, mask, adv, f32(rng.uniform(0.0, 3.0, (N, T))))


def trl(b: Batch, on_policy: bool, num_items: float, **cfg):
  """TRL's (loss, d loss / d logps, metrics)."""
  logps = torch.tensor(b.logps, requires_grad=True)
  inputs = {
      "prompt_ids": torch.zeros((N, 1), dtype=torch.long),
      "prompt_mask": torch.ones((N, 1), dtype=torch.long),
      "completion_ids": torch.zeros((N, T), dtype=torch.long),
      "completion_mask": torch.tensor(b.mask),
      "advantages": torch.tensor(b.adv),
      "ref_per_token_logps": torch.tensor(b.ref),
      "num_items_in_batch": torch.tensor(num_items),
      "_logps": logps,
      "_entropies": torch.tensor(b.ent),
  }
  if not on_policy:
    inputs["old_per_token_logps"] = torch.tensor(b.old)
  loss, metrics = ref.GRPOLoss(max_completion_length=MAX_LEN, **cfg).loss(inputs)
  loss.backward()
  return loss.item(), logps.grad.numpy(), metrics


def ours(b: Batch, on_policy: bool, num_items: float | None, beta: float = 0.0, **cfg):
  """Our (loss, d loss / d logps, metrics)."""
  def f(lp):
    old = jax.lax.stop_gradient(lp) if on_policy else jnp.asarray(b.old)
    return P.policy_loss(lp, old, jnp.asarray(b.adv), jnp.asarray(b.mask), beta=beta,
                         ref_logps=jnp.asarray(b.ref) if beta else None,
                         max_completion_length=MAX_LEN, num_items_in_batch=num_items,
                         entropies=jnp.asarray(b.ent), **cfg)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b.logps))
  return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


# Settings on top of each loss type and level: TRL's defaults, DAPO's clip-higher with
# INTELLECT-2's delta, and the k3 KL with 1.16's bias correction (default on); the KL without
# it and on-policy (old_logps = the policy's, gradient-stopped) for two loss types.
VARIANTS = {
    "default": dict(),
    "clip_higher_delta": dict(epsilon=0.2, epsilon_high=0.28, delta=1.5),
    "kl": dict(beta=0.04),
}
CASES = [(t, lvl, v) for t in P.LOSS_TYPES for lvl in P.IMPORTANCE_SAMPLING_LEVELS
         for v in VARIANTS]
VARIANTS.update(kl_no_bias_correction=dict(beta=0.04, use_bias_correction_kl=False),
                kl_on_policy=dict(beta=0.1, on_policy=True))
CASES += [(t, lvl, v) for t in ("grpo", "dapo") for lvl in P.IMPORTANCE_SAMPLING_LEVELS
          for v in ("kl_no_bias_correction", "kl_on_policy")]


@pytest.mark.parametrize("loss_type, level, variant", CASES)
def test_policy_loss_matches_trl(loss_type, level, variant):
  cfg = dict(VARIANTS[variant])
  on_policy = cfg.pop("on_policy", False)
  cfg.update(loss_type=loss_type, importance_sampling_level=level)
  for seed in SEEDS:
    b = batch(seed)
    # dapo's normaliser: TRL's num_items_in_batch (one process, no accumulation) is the batch's
    # token count unless the generation batch is bigger; pass a larger count to see it used.
    num_items = float(b.mask.sum() + 3) if loss_type == "dapo" else None
    got_loss, got_grad, got_m = ours(b, on_policy, num_items, **cfg)
    want_loss, want_grad, want_m = trl(b, on_policy, num_items or float(b.mask.sum()), **cfg)
    assert got_loss == pytest.approx(want_loss, rel=RTOL, abs=1e-7), seed
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=1e-7, err_msg=str(seed))
    assert set(got_m) == set(want_m), (sorted(got_m), sorted(want_m))
    for k, v in want_m.items():
      assert got_m[k] == pytest.approx(v, rel=RTOL, abs=1e-7), (seed, k)


def test_bias_correction_changes_the_on_policy_kl_gradient():
  # Guards the test above: on-policy the corrected KL keeps its value, and its gradient gains
  # k3 * d r / d logp = k3 per token (r = 1), over grpo's normaliser n * T_i.
  b, beta = batch(0), 0.1
  with_bc = ours(b, True, None, beta=beta, loss_type="grpo")
  without = ours(b, True, None, beta=beta, loss_type="grpo", use_bias_correction_kl=False)
  assert with_bc[0] == pytest.approx(without[0], rel=1e-6)
  d = b.ref - b.logps
  k3 = np.exp(d) - d - 1.0
  norm = N * np.maximum(b.mask.sum(1, keepdims=True), 1.0)
  np.testing.assert_allclose(with_bc[1] - without[1], beta * k3 * b.mask / norm, rtol=1e-3,
                             atol=1e-8)


@pytest.mark.parametrize("loss_type", P.LOSS_TYPES)
def test_gradient_accumulation_normalisers_match_trl(loss_type):
  # TRL 1.16 divides grpo/bnpo/dr_grpo by the accumulation steps, and dapo's generation-batch
  # count by steps_per_generation / accumulation steps; here the caller passes that count.
  b = batch(1)
  gen_tokens, ga, spg = float(b.mask.sum() * 4), 2, 4
  want, _, _ = trl(b, False, gen_tokens, loss_type=loss_type, gradient_accumulation_steps=ga,
                   steps_per_generation=spg)
  if loss_type == "dapo":
    got = ours(b, False, gen_tokens * ga / spg, loss_type=loss_type)[0]
  else:
    got = ours(b, False, None, loss_type=loss_type)[0] / ga
  assert got == pytest.approx(want, rel=RTOL)


def rewards_per_func(seed: int, n_prompts: int, g: int) -> np.ndarray:
  """`[n, 2]` rewards of two functions: 0/1 answers (some groups all equal) and a score with
  a few None (NaN) entries, one completion unscorable by both."""
  rng = np.random.default_rng(seed)
  answers = rng.integers(0, 2, (n_prompts, g)).astype(np.float32)
  answers[0] = 1.0  # a group with no spread
  scores = rng.normal(0.0, 1.0, (n_prompts, g)).astype(np.float32)
  scores[0] = 0.5
  out = np.stack([answers.reshape(-1), scores.reshape(-1)], 1)
  out[rng.integers(g, n_prompts * g, 3), 1] = np.nan
  out[g + 1] = np.nan
  return out


def total_reward(rpf: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """The weighted sum, NaN where every function returned None (what `rollouts` passes in)."""
  total = np.nansum(rpf * weights[None, :], axis=1)
  return np.where(np.isnan(rpf).all(1), np.nan, total).astype(np.float32)


@pytest.mark.parametrize("scale", A.SCALES)
def test_group_advantages_match_trl(scale):
  weights = np.asarray([1.0, 0.5], np.float32)
  for seed in SEEDS:
    for n_prompts, g in ((4, 4), (2, 8)):
      rpf = rewards_per_func(seed, n_prompts, g)
      want, std_zero = ref.grpo_advantages(torch.tensor(rpf), torch.tensor(weights), g, scale)
      got = A.group_advantages(total_reward(rpf, weights), g, scale=scale)
      np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=1e-6)
      # TRL logs frac_reward_zero_std per completion from isclose(std, 0); with group std
      # (group, none), groups of >= 2 scorable rewards agree with zero_spread_groups.
      if scale != "batch":
        zero = np.repeat(np.asarray(A.zero_spread_groups(total_reward(rpf, weights), g)), g)
        scorable = ~np.isnan(total_reward(rpf, weights)).reshape(-1, g)
        checked = np.repeat(scorable.sum(1) >= 2, g)
        np.testing.assert_array_equal(zero[checked], std_zero.numpy()[checked])


def test_leave_one_out_advantages_match_trl():
  weights = np.asarray([1.0, 0.5], np.float32)
  for seed in SEEDS:
    for n_prompts, g in ((4, 4), (8, 2)):
      rpf = rewards_per_func(seed, n_prompts, g)
      want, _ = ref.rloo_advantages(torch.tensor(rpf), torch.tensor(weights), g)
      got = A.leave_one_out_advantages(total_reward(rpf, weights), g)
      np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("max_len, cache", [(10, 4), (100, 20), (12, 0), (8, 8)])
def test_soft_overlong_penalty_matches_trl(max_len, cache):
  lengths = np.arange(0, max_len + 4)
  want = ref.SoftOverlongPunishment(max_len, cache)([[0] * int(n) for n in lengths])
  got = P.soft_overlong_penalty(jnp.asarray(lengths), max_len, cache)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)


def test_unknown_loss_type_is_rejected_like_trl():
  b = batch(0)
  with pytest.raises(ValueError, match="Unknown loss type"):
    trl(b, False, 1.0, loss_type="ppo")
  with pytest.raises(ConfigError, match="loss_type 'ppo' is unknown"):
    ours(b, False, None, loss_type="ppo")
