"""The PPO math of RLHF as pure jax functions: token rewards, GAE, whitening, losses, KL control.

Source: TRL v1.9.0 (tag commit 35def3e, 2026-07-21), the newest release in our TRL mirror
(which ends at main f2cd577, 1.10.0.dev0, where the file is unchanged), all of which ship the
PPO trainer (TRL 1.16 no longer does): `trl/experimental/ppo/ppo_trainer.py`, last changed in
fd09025 (2026-06-30). `PPOTrainer.train` steps 3-6
("Filter completion" to "compute advantages and returns") and the PPO update loop give
`kl_penalty`, `token_rewards`, `gae`, `ppo_policy_loss` and `ppo_value_loss`; `masked_mean`,
`masked_var` and `masked_whiten` follow the functions of those names, which at v1.9.0 live in
that same file (no longer in `trl/trainer/utils.py`). Defaults follow
`trl/experimental/ppo/ppo_config.py`: kl_coef 0.05, kl_estimator 'k1', cliprange 0.2,
cliprange_value 0.2, vf_coef 0.1 (the stage's weighting of the two losses), gamma 1.0, lam
0.95, whiten_rewards False. `adaptive_kl_update` is TRL's old `AdaptiveKLController.update`
(`trl/trainer/utils.py`, removed in 8c49ea3, #2480, 2024-12-19).

Inputs are per completion position, `[rows, t]`, with a 0/1 `mask` that is 1 on the real
completion tokens (the EOS/stop token included, as TRL's `~padding_mask`) and 0 on padding.
Everything is computed in float32. Values at masked-out positions never matter: every function
that takes a mask reads them through `jnp.where`, so garbage there (even NaN or inf) changes no
output and no gradient. All functions are jit-able: the settings that pick a code path (kind,
whiten, cliprange, cliprange_value, entropy_coef, missing_eos_penalty, target, horizon) must be
static; kl_coef, gamma and lam may be traced (validated only when they are python numbers).

Where we deliberately differ from TRL:

- The score goes to the LAST REAL TOKEN (the EOS token when there is one). TRL adds it at
  `sequence_lengths_p1`, the padding position after the EOS, whenever that position exists in
  the padded tensor (only a completion filling the whole buffer gets it on its last token). That
  position is not an action: it gets a value prediction that the value loss trains (TRL's value
  mask `~padding_mask_p1` reaches one position past the EOS) and an advantage that the policy
  loss drops, and GAE bootstraps from it, so with lam < 1 the EOS token's advantage becomes
  r_L - V_L + gamma lam score + gamma (1 - lam) V_{L+1}, depending on the value head's guess for
  a state after the episode ended, instead of r_L + score - V_L. Here the value after the last
  real token is 0 (the episode is over), and the value loss is meant to get the same mask as
  the policy loss. With gamma = lam = 1, or on completions filling the buffer, both give the
  same advantages on the real tokens.
- Reward whitening (`token_rewards(whiten=True)`) runs over the real tokens; TRL's over
  `~padding_mask_p1` includes the extra position.
- `approxkl` (and the ratio statistics) are means over the real tokens; TRL's approxkl is
  `0.5 * (logprobs_diff**2).mean()` over the whole padded tensor (padding contributes 0), so it
  shrinks with the padding fraction.
- Empty masks give 0 instead of TRL's NaN or ValueError (counts are clamped at 1), and the
  unbiased variance of a single element is 0 instead of a division by zero, so that these
  functions stay jit-able and a batch with one real token whitens to 0.
- `kl_penalty` also offers k2 (TRL's config accepts k1 and k3 only), `ppo_policy_loss` an
  optional entropy bonus (TRL only logs the entropy), `ppo_value_loss` `cliprange_value=None`
  (no clipping; TRL always clips).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError
from llmjax.rl.policy_loss import k3_kl

KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")
# Counts are clamped at 1 so an empty mask divides by 1, not 0 (see the module docstring).
_MIN_COUNT = 1.0
# TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8).
_WHITEN_EPS = 1e-8


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _is_python_number(x: object) -> bool:
  """True for python (or numpy) scalars we can validate; jax values may be tracers under jit."""
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_shapes(fn: str, mask: jax.Array, **arrays: jax.Array | None) -> tuple[int, int]:
  """ConfigError unless mask is `[rows, t]` and every given array has its shape."""
  shape = jnp.shape(mask)
  if len(shape) != 2:
    raise ConfigError(f"{fn}: mask must be [rows, t] per completion position, got shape {shape}.")
  for name, x in arrays.items():
    if x is not None and jnp.shape(x) != shape:
      raise ConfigError(f"{fn}: {name} has shape {jnp.shape(x)} but mask has {shape}; both are "
                        f"[rows, t] per completion position.")
  return shape


def _real(mask: jax.Array) -> jax.Array:
  return _f32(mask) > 0


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
  """Mean of x over the positions where mask is 1: a scalar, or per `axis`.

  TRL's `masked_mean`: sum(x * mask) / sum(mask); an empty mask gives 0 (TRL: NaN).

  Args:
    x: any shape.
    mask: 0/1, x's shape.
    axis: None for the mean over everything, else the axis to reduce.
  """
  real = _real(mask)
  total = jnp.sum(jnp.where(real, _f32(x), 0.0), axis=axis)
  return total / jnp.maximum(jnp.sum(real, axis=axis, dtype=jnp.float32), _MIN_COUNT)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of x over the positions where mask is 1, a scalar.

  TRL's `masked_var`: the masked mean of (x - mean)^2, times Bessel's n / (n - 1) when unbiased
  (TRL's default). One real element gives 0 (TRL divides by zero), none gives 0 (TRL raises).
  """
  centered = _f32(x) - masked_mean(x, mask)
  var = masked_mean(centered ** 2, mask)
  if unbiased:
    count = jnp.sum(_real(mask), dtype=jnp.float32)
    var = var * count / jnp.maximum(count - 1.0, 1.0)
  return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """x normalised by its masked mean and unbiased std, 0 at masked-out positions.

  TRL's `masked_whiten`: (x - mean) / sqrt(var + 1e-8), plus the mean again when shift_mean is
  False (TRL whitens rewards that way: rescaled, not centred). TRL leaves masked-out positions
  as computed and its trainer fills them with 0 afterwards; here they are 0 already.

  Args:
    x: `[rows, t]` (any shape).
    mask: 0/1, x's shape.
    shift_mean: subtract the mean (True) or only divide by the std (False).
  """
  x = _f32(x)
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(_real(mask), whitened, 0.0)


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) for tokens sampled from pi, `[rows, t]`.

  J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html),
  with d = logp - ref_logp (so E_pi[d] = KL(pi || pi_ref)):

    k1 = d                          unbiased, can be negative (TRL's default)
    k2 = d^2 / 2                    biased, >= 0, low variance
    k3 = exp(-d) + d - 1            unbiased, >= 0 (`policy_loss.k3_kl`)

  Args:
    logps: `[rows, t]` log-probabilities of the sampled tokens under the policy.
    ref_logps: `[rows, t]` the same under the reference model.
    kind: 'k1', 'k2' or 'k3'.

  Positions outside the completion are not masked here: `token_rewards` ignores them.
  """
  if kind not in KL_KINDS:
    raise ConfigError(f"kl_penalty: kind {kind!r} is unknown; use one of {KL_KINDS} (k1 is "
                      f"TRL's default, k3 is non-negative and unbiased).")
  if jnp.shape(logps) != jnp.shape(ref_logps):
    raise ConfigError(f"kl_penalty: logps has shape {jnp.shape(logps)} but ref_logps has "
                      f"{jnp.shape(ref_logps)}; pass both per completion token.")
  if kind == "k3":
    return k3_kl(logps, ref_logps)
  d = _f32(logps) - _f32(ref_logps)
  return d if kind == "k1" else 0.5 * d ** 2


def last_token_mask(mask: jax.Array) -> jax.Array:
  """`[rows, t]` float32, 1 at the last position where each row's mask is 1 (none if empty)."""
  real = _real(mask)
  t = real.shape[-1]
  last = t - 1 - jnp.argmax(real[:, ::-1], axis=-1)
  one_hot = jnp.arange(t)[None, :] == last[:, None]
  return (one_hot & real.any(-1, keepdims=True)).astype(jnp.float32)


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, *, kl_coef: float = 0.05,
                  eos_seen: jax.Array | None = None, missing_eos_penalty: float | None = None,
                  whiten: bool = False) -> jax.Array:
  """Per-token RLHF rewards `[rows, t]`: a KL penalty on every token, the score on the last.

  The KL-penalised reward R = score - beta log(pi / pi_ref) of "Fine-Tuning Language Models
  from Human Preferences" (Ziegler et al. 2019, arXiv:1909.08593), spread over the tokens as
  TRL's PPOTrainer does: with m the mask and L the last real token of the row,

    r_t = -kl_coef * kl_t * m_t + [t = L] * (score - missing_eos_penalty * [no EOS])

  The score goes to the last real token, the EOS token when the completion has one. TRL's
  PPOTrainer adds it at `sequence_lengths_p1`, the position AFTER the last token, whenever that
  position exists in the padded tensor, a position that is not an action (see the module
  docstring for what that does to GAE); we do not.

  Args:
    scores: `[rows]` reward-model scores of the completions.
    kl: `[rows, t]` per-token KL estimates (`kl_penalty`).
    mask: `[rows, t]` 1 on real completion tokens (EOS included), 0 on padding. A row without
      real tokens gets no reward: there is no action to credit.
    kl_coef: the KL coefficient (beta in Ziegler et al.), >= 0; may be a jax scalar (from
      `adaptive_kl_update`).
    eos_seen: `[rows]` bool, True when the completion ended with its stop token (the rollouts'
      `stopped`); needed with missing_eos_penalty, unused without it.
    missing_eos_penalty: subtracted from the score of completions without EOS (TRL's
      `missing_eos_penalty`: those that hit the length limit), >= 0; None = off.
    whiten: rescale the rewards by their std over the real tokens, not centred (TRL's
      `whiten_rewards`: `masked_whiten(shift_mean=False)`).
  """
  fn = "token_rewards"
  rows, _ = _check_shapes(fn, mask, kl=kl)
  if jnp.shape(scores) != (rows,):
    raise ConfigError(f"{fn}: scores must be [rows] = ({rows},), one per completion, got shape "
                      f"{jnp.shape(scores)}.")
  if _is_python_number(kl_coef) and not kl_coef >= 0:
    raise ConfigError(f"{fn}: kl_coef must be >= 0, got {kl_coef}; TRL's default is 0.05.")
  if missing_eos_penalty is not None:
    if not missing_eos_penalty >= 0:
      raise ConfigError(f"{fn}: missing_eos_penalty is subtracted from the score and must be "
                        f">= 0, got {missing_eos_penalty}; or leave it None.")
    if eos_seen is None:
      raise ConfigError(f"{fn}: missing_eos_penalty needs eos_seen ([rows] bool, the rollouts' "
                        f"`stopped`) to know which completions lack an EOS.")
    if jnp.shape(eos_seen) != (rows,):
      raise ConfigError(f"{fn}: eos_seen must be [rows] = ({rows},), got shape "
                        f"{jnp.shape(eos_seen)}.")
  real = _real(mask)
  scores = _f32(scores)
  if missing_eos_penalty is not None:
    scores = jnp.where(jnp.asarray(eos_seen, bool), scores, scores - missing_eos_penalty)
  rewards = jnp.where(real, -_f32(kl_coef) * _f32(kl), 0.0)
  rewards = rewards + last_token_mask(mask) * scores[:, None]
  if whiten:
    rewards = masked_whiten(rewards, mask, shift_mean=False)
  return rewards


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimates and returns, `[rows, t]` each, 0 at masked-out positions.

  GAE(gamma, lambda) of "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (Schulman et al. 2016, arXiv:1506.02438): over the real tokens t of a row,

    delta_t = r_t + gamma V_{t+1} - V_t,      A_t = sum_l (gamma lam)^l delta_{t+l}

  computed backwards as A_t = delta_t + gamma lam A_{t+1}, with V and A after the last real
  token 0 (the episode ends there). Returns are A_t + V_t, the value targets (TD(lambda)).

  Masked-out positions are not steps of the episode: their rewards and values are ignored, and
  with right padding (TRL's layout, the usual one) this is exactly "V after the last real token
  is 0". The scan skips them rather than assuming where they are, so any 0/1 mask gives the
  GAE of the row with its masked-out positions deleted (an interior 0, say a tool-output token,
  is bridged: the next step of the token before it is the token after it).

  Args:
    rewards: `[rows, t]` per-token rewards (`token_rewards`).
    values: `[rows, t]` V(s_t), the value of the state before token t is generated.
    mask: `[rows, t]` 1 on real completion tokens.
    gamma: discount in [0, 1] (TRL's default 1).
    lam: GAE's lambda in [0, 1] (TRL's default 0.95): 0 is the one-step TD error, 1 the
      Monte-Carlo return minus V.
  """
  fn = "gae"
  _check_shapes(fn, mask, rewards=rewards, values=values)
  for name, x in (("gamma", gamma), ("lam", lam)):
    if _is_python_number(x) and not 0.0 <= x <= 1.0:
      raise ConfigError(f"{fn}: {name} must lie in [0, 1], got {x}; TRL uses gamma 1.0 and "
                        f"lam 0.95.")
  real = _real(mask)
  rewards = jnp.where(real, _f32(rewards), 0.0)
  values = jnp.where(real, _f32(values), 0.0)
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, x):
    next_value, next_adv = carry
    r, v, m = x
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    # A masked-out position passes the next real step's value and advantage through untouched.
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(real.shape[0], jnp.float32)
  _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, real.T), reverse=True)
  advantages = advantages.T
  return advantages, jnp.where(real, advantages + values, 0.0)


def token_entropy(logits: jax.Array) -> jax.Array:
  """`[rows, t]` entropy of the policy's next-token distribution, differentiable, float32.

  H = logsumexp(z) - sum softmax(z) z, as TRL computes it, from `[rows, t, vocab]` logits (the
  policy's, after any temperature scaling). For `ppo_policy_loss`'s entropy bonus.
  """
  logits = _f32(logits)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits,
                                                     axis=-1)


def ppo_policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                    mask: jax.Array, *, cliprange: float = 0.2, entropies: jax.Array | None = None,
                    entropy_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate loss over the real tokens, and its metrics.

  "Proximal Policy Optimization Algorithms" (Schulman et al. 2017, arXiv:1707.06347), Eq. (7),
  negated and averaged over the masked tokens as TRL's PPOTrainer: with r = exp(logp - old_logp),

    loss = masked_mean(max(-A r, -A clip(r, 1 - cliprange, 1 + cliprange)))
           - entropy_coef * masked_mean(entropy)

  The clip stops the gradient of tokens whose ratio already left the trust region in the
  advantage's direction (r > 1 + cliprange with A > 0, r < 1 - cliprange with A < 0).

  Args:
    logps: `[rows, t]` log-probabilities of the sampled tokens under the policy being trained
      (the only input gradients flow through, with entropies).
    old_logps: `[rows, t]` the same under the policy that sampled them (gradient-stopped).
    advantages: `[rows, t]` (whitened) GAE advantages (gradient-stopped).
    mask: `[rows, t]` 1 on real completion tokens.
    cliprange: PPO's epsilon, in (0, 1); TRL's default 0.2.
    entropies: optional `[rows, t]` policy entropies (`token_entropy`): logged as 'entropy',
      and with entropy_coef > 0 an entropy bonus (Mnih et al. 2016, arXiv:1602.01783; PPO Eq.
      (9)); TRL's PPOTrainer only logs it.
    entropy_coef: the bonus weight, >= 0; 0 = off.

  Returns:
    (loss, metrics), metrics gradient-stopped scalars over the real tokens: 'pg_loss' (the
    surrogate alone), 'clipfrac' (fraction of tokens where the clipped term wins, TRL's
    policy/clipfrac_avg), 'approxkl' (0.5 mean (logp - old_logp)^2, TRL's policy/approxkl_avg,
    but over real tokens only), 'ratio_mean' (TRL's val/ratio), 'ratio_min', 'ratio_max'
    (inf and -inf for an empty mask), and 'entropy' when entropies are given.
  """
  fn = "ppo_policy_loss"
  _check_shapes(fn, mask, logps=logps, old_logps=old_logps, advantages=advantages,
                entropies=entropies)
  if not 0.0 < cliprange < 1.0:
    raise ConfigError(f"{fn}: cliprange (PPO's epsilon) must lie in (0, 1), got {cliprange}; "
                      f"0.2 is the usual value.")
  if not entropy_coef >= 0.0:
    raise ConfigError(f"{fn}: entropy_coef must be >= 0 (0 = no bonus), got {entropy_coef}.")
  if entropy_coef > 0.0 and entropies is None:
    raise ConfigError(f"{fn}: entropy_coef={entropy_coef} needs entropies (`token_entropy` of "
                      f"the policy's logits), or set entropy_coef=0.")
  real = _real(mask)
  # Zeroing padding before exp() keeps garbage there out of the values and the gradients.
  log_ratio = jnp.where(real, _f32(logps) - jax.lax.stop_gradient(_f32(old_logps)), 0.0)
  advantages = jnp.where(real, jax.lax.stop_gradient(_f32(advantages)), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  pg_loss = masked_mean(jnp.maximum(unclipped, clipped), real)
  loss = pg_loss
  metrics = {
      "pg_loss": pg_loss,
      "clipfrac": masked_mean(clipped > unclipped, real),
      "approxkl": 0.5 * masked_mean(log_ratio ** 2, real),
      "ratio_mean": masked_mean(ratio, real),
      "ratio_min": jnp.min(jnp.where(real, ratio, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(real, ratio, -jnp.inf)),
  }
  if entropies is not None:
    entropy = masked_mean(jnp.where(real, _f32(entropies), 0.0), real)
    metrics["entropy"] = entropy
    if entropy_coef > 0.0:
      loss = loss - entropy_coef * entropy
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                   *, cliprange_value: float | None = 0.2
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped value loss over the real tokens, and its clip fraction.

  As TRL's PPOTrainer (from OpenAI's baselines ppo2; "Implementation Matters in Deep Policy
  Gradients", Engstrom et al. 2020, arXiv:2005.12729, lists it among PPO's code-level tricks): with
  V_clip = clip(V, V_old - c, V_old + c) and R the returns,

    loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

  Args:
    values: `[rows, t]` the value head's predictions now (gradients flow through).
    old_values: `[rows, t]` its predictions at rollout time, which GAE used (gradient-stopped).
    returns: `[rows, t]` the targets, `gae`'s returns (gradient-stopped).
    mask: `[rows, t]` 1 on real completion tokens.
    cliprange_value: c > 0, in the reward's units (TRL's default 0.2); None = no clipping.

  Returns:
    (loss, metrics): metrics {'vf_clipfrac': the fraction of real tokens where the clipped
    error is the larger, TRL's val/clipfrac_avg}, gradient-stopped.
  """
  fn = "ppo_value_loss"
  _check_shapes(fn, mask, values=values, old_values=old_values, returns=returns)
  if cliprange_value is not None and not cliprange_value > 0.0:
    raise ConfigError(f"{fn}: cliprange_value must be > 0 (0.2 in TRL), or None to not clip, "
                      f"got {cliprange_value}.")
  real = _real(mask)
  values = jnp.where(real, _f32(values), 0.0)
  old_values = jnp.where(real, jax.lax.stop_gradient(_f32(old_values)), 0.0)
  returns = jnp.where(real, jax.lax.stop_gradient(_f32(returns)), 0.0)
  unclipped = (values - returns) ** 2
  if cliprange_value is None:
    clipped = unclipped
  else:
    clipped = (jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
               - returns) ** 2
  loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), real)
  metrics = {"vf_clipfrac": masked_mean(clipped > unclipped, real)}
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var(returns - values) / Var(returns) over the real tokens, a scalar.

  1 = the value head predicts the returns perfectly, 0 = no better than their mean, < 0 =
  worse. NaN when the returns have no variance (as OpenAI baselines' `explained_variance`).
  """
  _check_shapes("explained_variance", mask, values=values, returns=returns)
  var_returns = masked_var(returns, mask)
  ratio = masked_var(_f32(returns) - _f32(values), mask) / var_returns
  return jnp.where(var_returns > 0, 1.0 - ratio, jnp.nan)


def adaptive_kl_update(kl_coef: float | jax.Array, current_kl: float | jax.Array,
                       n_steps: int | jax.Array, *, target: float,
                       horizon: float) -> jax.Array:
  """The next KL coefficient of the adaptive KL controller, a float32 scalar.

  "Fine-Tuning Language Models from Human Preferences" (Ziegler et al. 2019,
  arXiv:1909.08593; their K_beta is n_steps / horizon here), as TRL's former
  `AdaptiveKLController.update`:

    e = clip(current_kl / target - 1, -0.2, 0.2)
    kl_coef' = kl_coef * (1 + e * n_steps / horizon)

  so the coefficient grows while the policy's KL to the reference is above the target and
  shrinks while it is below, by at most a factor 1 +- 0.2 n_steps / horizon per update.

  Args:
    kl_coef: the current coefficient (> 0, or it stays 0).
    current_kl: the measured KL per completion: the sum over its tokens of the per-token KL,
      averaged over the batch (TRL's objective/kl).
    n_steps: completions seen since the last update (the batch size).
    target: the target KL in nats per completion, > 0 (TRL's old default 6).
    horizon: the number of completions over which the error is corrected, > 0 (TRL's old
      default 10000).
  """
  if not target > 0:
    raise ConfigError(f"adaptive_kl_update: target (the KL per completion to hold) must be > 0, "
                      f"got {target}; Ziegler et al. and TRL used 6.")
  if not horizon > 0:
    raise ConfigError(f"adaptive_kl_update: horizon must be > 0 completions, got {horizon}; "
                      f"Ziegler et al. and TRL used 10000.")
  error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
  return _f32(kl_coef) * (1.0 + error * _f32(n_steps) / horizon)
