"""The GRPO policy loss family as pure jax functions, defined as TRL defines them.

Source: TRL 1.16.0 (the release wheel): `trl/trainer/grpo_trainer.py` (`GRPOTrainer._compute_loss`,
the truncation mask in `_generate_and_score_completions`), `trl/trainer/grpo_config.py`
(defaults: epsilon 0.2, epsilon_high = epsilon, beta 0.0, importance_sampling_level 'token',
use_bias_correction_kl True; TRL's default loss_type is 'dapo') and
`trl/rewards/other_rewards.py` (`get_soft_overlong_punishment`). Checked against those functions'
own code in `tests/rl/test_trl116_grpo.py`.

Inputs are per completion token, `[n, t]`: the policy's log-probabilities `logps` (the only
input gradients flow through), those of the policy that sampled the completions `old_logps`
and of the reference model `ref_logps` (both gradient-stopped), and the 0/1 completion `mask`;
advantages are per completion, `[n]`. Everything is computed in float32.

`policy_loss` returns the loss of one micro-batch. TRL divides grpo/bnpo/dr_grpo by the number
of gradient-accumulation steps afterwards (the trainer's business, not the loss's); dapo
instead divides by the completion-token count of one optimiser step (TRL 1.16: the generation
batch's count / num_processes * gradient_accumulation_steps / steps_per_generation), which is
`num_items_in_batch` here (default: this batch's token count, the single-process,
no-accumulation form). Not ported: TRL's cispo, sapo, luspo and vespo loss types, the
off-policy mask, entropy masking (top_entropy_quantile), the entropy bonus (entropy_coef) and
the vLLM importance-sampling correction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
# Token counts are clamped at 1, as TRL does, so an empty completion or batch does not divide by 0.
_MIN_COUNT = 1.0


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || pi_ref), `[n, t]`.

  J. Schulman, "Approximating KL Divergence" (2020), as used by DeepSeekMath's GRPO
  (arXiv:2402.03300, Eq. (4)): with d = ref_logp - logp,

    k3 = exp(d) - d - 1  (>= 0, unbiased for tokens sampled from pi).
  """
  d = _f32(ref_logps) - _f32(logps)
  return jnp.exp(d) - d - 1.0


def _check_args(fn: str, logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                mask: jax.Array, loss_type: str, epsilon: float, epsilon_high: float | None,
                beta: float, ref_logps: jax.Array | None, importance_sampling_level: str,
                max_completion_length: int | None, delta: float | None,
                num_items_in_batch: object | None) -> float:
  """Raises ConfigError for a bad `policy_loss` call; returns epsilon_high."""
  if loss_type not in LOSS_TYPES:
    raise ConfigError(f"{fn}: loss_type {loss_type!r} is unknown; use one of {LOSS_TYPES}.")
  if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
    raise ConfigError(f"{fn}: importance_sampling_level {importance_sampling_level!r} is unknown; "
                      f"use one of {IMPORTANCE_SAMPLING_LEVELS}.")
  if not 0.0 < epsilon < 1.0:
    raise ConfigError(f"{fn}: epsilon (the lower clip range, ratio >= 1 - epsilon) must lie in "
                      f"(0, 1), got {epsilon}; 0.2 is the usual value.")
  epsilon_high = epsilon if epsilon_high is None else epsilon_high
  if epsilon_high < epsilon:
    raise ConfigError(f"{fn}: epsilon_high={epsilon_high} is below epsilon={epsilon}; clip-higher "
                      f"(DAPO) widens the upper range only: set epsilon_high >= epsilon (DAPO "
                      f"uses 0.28 with epsilon 0.2) or leave it None.")
  if delta is not None and not delta > 1.0 + epsilon_high:
    raise ConfigError(f"{fn}: delta={delta} must exceed 1 + epsilon_high = {1.0 + epsilon_high} "
                      f"(it caps the ratio of negative-advantage tokens above the clip range); "
                      f"INTELLECT-2 recommends 4, or leave it None.")
  if not beta >= 0.0:
    raise ConfigError(f"{fn}: beta (the KL coefficient) must be >= 0, got {beta}.")
  if beta > 0.0 and ref_logps is None:
    raise ConfigError(f"{fn}: beta={beta} adds a KL penalty to the reference model; pass "
                      f"ref_logps, or set beta=0.")
  if beta == 0.0 and ref_logps is not None:
    raise ConfigError(f"{fn}: ref_logps were passed but beta=0 ignores them; set beta > 0 (0.001 "
                      f"in DeepSeek-R1) or skip the reference forward pass.")
  if loss_type == "dr_grpo":
    if max_completion_length is None or max_completion_length < 1:
      raise ConfigError(f"{fn}: loss_type 'dr_grpo' divides by n * max_completion_length; pass "
                        f"max_completion_length (the generation budget in tokens), got "
                        f"{max_completion_length!r}.")
  if num_items_in_batch is not None and loss_type != "dapo":
    raise ConfigError(f"{fn}: num_items_in_batch is dapo's normaliser and has no effect on "
                      f"loss_type {loss_type!r}; drop it.")
  shape = jnp.shape(logps)
  if len(shape) != 2:
    raise ConfigError(f"{fn}: logps must be [n, t] per completion token, got shape {shape}.")
  for name, x in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
    if x is not None and jnp.shape(x) != shape:
      raise ConfigError(f"{fn}: {name} has shape {jnp.shape(x)} but logps has {shape}; both are "
                        f"[n, t] per completion token.")
  if jnp.shape(advantages) not in ((shape[0],), shape):
    raise ConfigError(f"{fn}: advantages must be [n] (one per completion) or [n, t], got shape "
                      f"{jnp.shape(advantages)} for logps {shape}.")
  return epsilon_high


def policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array,
                *, loss_type: str = "grpo", epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0,
                ref_logps: jax.Array | None = None, importance_sampling_level: str = "token",
                max_completion_length: int | None = None, delta: float | None = None,
                num_items_in_batch: jax.Array | float | None = None,
                entropies: jax.Array | None = None,
                use_bias_correction_kl: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped policy-gradient loss of TRL's `GRPOTrainer` and its metrics.

  Args:
    logps: `[n, t]` per-token log-probabilities of the completions under the policy.
    old_logps: `[n, t]` the same under the policy that sampled them (equal to logps on the
      first update of a batch, making the ratio exactly 1).
    advantages: `[n]` per completion (or `[n, t]` per token).
    mask: `[n, t]` 1 on completion tokens that count, 0 on padding (and on masked rows, see
      `mask_truncated_completions`).
    loss_type: the aggregation, one of `LOSS_TYPES` (see below).
    epsilon: the lower clip range, ratio >= 1 - epsilon.
    epsilon_high: the upper clip range, ratio <= 1 + epsilon_high; default epsilon. DAPO's
      clip-higher ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
      arXiv:2503.14476, Eq. (10)) sets it above epsilon (0.28) so unlikely tokens with a
      positive advantage can grow further.
    beta: the coefficient of the per-token k3 KL to the reference (`k3_kl`), added to the
      per-token loss; 0 (TRL's default) needs no reference.
    ref_logps: `[n, t]` reference-model log-probabilities; required iff beta > 0.
    importance_sampling_level: 'token' (PPO/GRPO: one ratio per token) or 'sequence' (GSPO,
      "Group Sequence Policy Optimization", arXiv:2507.18071, Eq. (7)): one ratio per
      completion, s = exp(mean over its tokens of (logp - old_logp)), clipped and applied to
      every token of the completion before the aggregation, as TRL does. (With bnpo, dr_grpo
      and dapo this weights each completion by its length; TRL warns, GSPO's paper uses grpo.)
    max_completion_length: the generation budget; dr_grpo's constant normaliser.
    delta: INTELLECT-2's two-sided clip ("INTELLECT-2: A Reasoning Model Trained Through
      Globally Decentralized Reinforcement Learning", arXiv:2505.07291): the unclipped ratio is
      also capped at delta, bounding the loss of negative-advantage tokens; None = off.
    num_items_in_batch: dapo only: the completion-token count of the whole accumulated batch
      (all micro-batches of one optimiser step; over processes, per process) so that summing
      the micro-batch losses gives a token mean over the step; default this batch's
      `mask.sum()`. (TRL 1.16 passes the generation batch's count / num_processes rescaled by
      gradient_accumulation_steps / steps_per_generation: the mean count per optimiser step.)
    entropies: optional `[n, t]` per-token policy entropies, only logged (metric 'entropy').
    use_bias_correction_kl: multiply the k3 KL by the (unclipped, differentiable) ratio r_it,
      so its gradient is the unbiased reverse-KL gradient also for off-policy tokens
      ("DeepSeek-V3.2", arXiv:2512.02556). TRL 1.16's default (it was off before 1.16). Its
      value is unchanged on-policy (r = 1), its gradient is not: d(r k3) = d k3 + k3 d logp.

  With r_it the ratio (exp(logp - old_logp), or the GSPO s_i on every token),
  clip(r) = clip(r, 1 - epsilon, 1 + epsilon_high), m the mask, T_i = sum_t m_it (clamped at 1
  like every count here), the per-token loss is (PPO, arXiv:1707.06347, Eq. (7); GRPO,
  arXiv:2402.03300, Eq. (3))

    l_it = -min(r_it A_i, clip(r_it) A_i) + beta w_it k3_it

  with w_it = r_it under use_bias_correction_kl (before the delta cap), else 1.

  and the loss aggregates it as loss_type says:

  - grpo (DeepSeekMath, arXiv:2402.03300): 1/n sum_i (1/T_i sum_t m_it l_it), a token mean
    per completion, then the mean over completions.
  - bnpo: sum_it m_it l_it / sum_it m_it, a token mean over the batch.
  - dr_grpo ("Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783):
    sum_it m_it l_it / (n * max_completion_length), a constant normaliser.
  - dapo (arXiv:2503.14476, Eq. (12), token-level): sum_it m_it l_it / num_items_in_batch,
    i.e. bnpo over the whole accumulated batch.

  Returns:
    (loss, metrics): the scalar loss, and gradient-stopped scalars named as TRL logs them:
    'clip_ratio/low_mean' (fraction of tokens with r < 1 - epsilon and A < 0, whose gradient
    the clip stops), 'clip_ratio/high_mean' (r > 1 + epsilon_high and A > 0),
    'clip_ratio/region_mean' (either), 'clip_ratio/low_min' and 'clip_ratio/high_max' (the
    smallest / largest per-completion clipped fraction; completions with no tokens are
    skipped), 'kl' (token mean of w k3, when beta > 0) and 'entropy' (token mean, when
    entropies are given). At the sequence level the clip fractions count completions, not
    tokens, as TRL does.
  """
  fn = "policy_loss"
  epsilon_high = _check_args(fn, logps, old_logps, advantages, mask, loss_type, epsilon,
                             epsilon_high, beta, ref_logps, importance_sampling_level,
                             max_completion_length, delta, num_items_in_batch)
  logps = _f32(logps)
  old_logps = jax.lax.stop_gradient(_f32(old_logps))
  mask = _f32(mask)
  advantages = jax.lax.stop_gradient(_f32(advantages))
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  lengths = mask.sum(-1)

  log_ratio = logps - old_logps
  if importance_sampling_level == "token":
    log_weights = log_ratio
  else:
    # `[n, 1]`: one GSPO ratio per completion, broadcast over its tokens below.
    log_weights = ((log_ratio * mask).sum(-1) / jnp.maximum(lengths, _MIN_COUNT))[:, None]
  ratio = jnp.exp(log_weights)
  if beta > 0.0:
    per_token_kl = k3_kl(logps, jax.lax.stop_gradient(_f32(ref_logps)))
    if use_bias_correction_kl:
      # The ratio before the delta cap, and not gradient-stopped, as TRL's coef_1.
      per_token_kl = per_token_kl * ratio
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
  if delta is not None:
    ratio = jnp.minimum(ratio, delta)
  per_token_loss = -jnp.minimum(ratio * advantages, clipped * advantages)
  if beta > 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  per_token_loss = jnp.broadcast_to(per_token_loss, mask.shape)

  masked_sum = (per_token_loss * mask).sum()
  if loss_type == "grpo":
    loss = ((per_token_loss * mask).sum(-1) / jnp.maximum(lengths, _MIN_COUNT)).mean()
  elif loss_type == "bnpo":
    loss = masked_sum / jnp.maximum(mask.sum(), _MIN_COUNT)
  elif loss_type == "dr_grpo":
    loss = masked_sum / (mask.shape[0] * max_completion_length)
  else:
    count = mask.sum() if num_items_in_batch is None else _f32(num_items_in_batch)
    loss = masked_sum / jnp.maximum(count, _MIN_COUNT)

  per_sequence = importance_sampling_level == "sequence"
  metrics = _metrics(ratio, advantages, mask, epsilon, epsilon_high, per_sequence)
  if beta > 0.0:
    metrics["kl"] = _global_masked_mean(per_token_kl, mask, False)
  if entropies is not None:
    metrics["entropy"] = _global_masked_mean(_f32(entropies), mask, False)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _global_masked_mean(x: jax.Array, mask: jax.Array, per_sequence: bool) -> jax.Array:
  """Token mean of `[n, t]` x; of a `[n, 1]` per-sequence x, the mean over all completions."""
  if per_sequence:
    return x.mean()
  return (x * mask).sum() / jnp.maximum(mask.sum(), _MIN_COUNT)


def _metrics(ratio: jax.Array, advantages: jax.Array, mask: jax.Array, epsilon: float,
             epsilon_high: float, per_sequence: bool) -> dict[str, jax.Array]:
  """TRL's clip_ratio/* metrics (see `policy_loss`)."""
  low = ((ratio < 1.0 - epsilon) & (advantages < 0)).astype(jnp.float32)
  high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
  region = jnp.maximum(low, high)
  # Per-token advantages make the flags per token even at the sequence level (as in TRL).
  per_sequence = per_sequence and low.shape[1] == 1
  if per_sequence:
    per_seq_low, per_seq_high = low[:, 0], high[:, 0]
    valid = jnp.ones(mask.shape[0], bool)
  else:
    lengths = mask.sum(-1)
    # TRL divides unclamped and nan-skips the empty completions; `valid` does the same.
    valid = lengths > 0
    per_seq_low = (low * mask).sum(-1) / jnp.maximum(lengths, _MIN_COUNT)
    per_seq_high = (high * mask).sum(-1) / jnp.maximum(lengths, _MIN_COUNT)
  any_valid = valid.any()
  low_min = jnp.where(any_valid, jnp.min(jnp.where(valid, per_seq_low, jnp.inf)), jnp.nan)
  high_max = jnp.where(any_valid, jnp.max(jnp.where(valid, per_seq_high, -jnp.inf)), jnp.nan)
  return {
      "clip_ratio/low_mean": _global_masked_mean(low, mask, per_sequence),
      "clip_ratio/high_mean": _global_masked_mean(high, mask, per_sequence),
      "clip_ratio/region_mean": _global_masked_mean(region, mask, per_sequence),
      "clip_ratio/low_min": low_min,
      "clip_ratio/high_max": high_max,
  }


def soft_overlong_penalty(lengths: jax.Array, max_completion_length: int,
                          cache_length: int) -> jax.Array:
  """DAPO's soft overlong punishment `[n]`, a reward term counted in completion tokens.

  "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476), Eq.
  (13), as TRL's `get_soft_overlong_punishment`: with L = max_completion_length, C =
  cache_length and |y| the completion length,

    0                     if |y| <= L - C
    ((L - C) - |y|) / C   if L - C < |y| <= L   (falls linearly from 0 to -1)
    -1                    if |y| > L

  Args:
    lengths: `[n]` completion lengths in tokens.
    max_completion_length: L, > 0.
    cache_length: C, in [0, L]; 0 gives 0 up to L and -1 past it.
  """
  if not isinstance(max_completion_length, int) or max_completion_length < 1:
    raise ConfigError(f"soft_overlong_penalty: max_completion_length must be a positive int, "
                      f"got {max_completion_length!r}.")
  if not isinstance(cache_length, int) or not 0 <= cache_length <= max_completion_length:
    raise ConfigError(f"soft_overlong_penalty: cache_length must be an int in [0, "
                      f"max_completion_length={max_completion_length}], got {cache_length!r}; "
                      f"DAPO uses 4096 of 20480.")
  lengths = _f32(lengths)
  start = float(max_completion_length - cache_length)
  ramp = (start - lengths) / max(cache_length, 1)
  return jnp.where(lengths <= start, 0.0,
                   jnp.where(lengths <= max_completion_length, ramp, -1.0))


def completion_mask(lengths: jax.Array, max_length: int) -> jax.Array:
  """`[n, max_length]` float32 mask, 1 on the first lengths[i] tokens of row i.

  Args:
    lengths: `[n]` completion lengths in tokens (the stop token included, as TRL masks it).
    max_length: the padded completion length t.
  """
  return (jnp.arange(max_length)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


def mask_truncated_completions(mask: jax.Array, stopped: jax.Array) -> jax.Array:
  """TRL's `mask_truncated_completions`: zero the mask rows of truncated completions `[n, t]`.

  A completion that hit the length limit without a stop token has no final answer, so its
  (usually low) reward says little about its tokens; DAPO (arXiv:2503.14476, Sec. 3.4,
  overlong filtering) drops it from the loss. TRL calls a completion truncated when its last
  token is neither EOS nor padding; here the sampler's `SampleOutput.stopped` says it
  directly, so a completion ended by a stop string also counts as finished.

  Args:
    mask: `[n, t]` completion mask.
    stopped: `[n]` bool, True when a stop token or string ended the completion.
  """
  stopped = jnp.asarray(stopped)
  if stopped.shape != jnp.shape(mask)[:1]:
    raise ConfigError(f"mask_truncated_completions: stopped has shape {stopped.shape}, expected "
                      f"[n] = {jnp.shape(mask)[:1]} for a mask of shape {jnp.shape(mask)}.")
  return jnp.asarray(mask) * stopped.astype(jnp.asarray(mask).dtype)[:, None]
