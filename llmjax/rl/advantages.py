"""Advantages from per-completion rewards, as pure jax functions defined as TRL defines them.

Source: TRL 1.16.0 (the release wheel): `trl/trainer/grpo_trainer.py`
(`GRPOTrainer._generate_and_score_completions`, the `sum_then_normalize` path),
`trl/trainer/rloo_trainer.py` (`RLOOTrainer._generate_and_score_completions`, the leave-one-out
baseline) and `nanstd` in `trl/trainer/utils.py`; checked against that code in
`tests/rl/test_trl116_grpo.py`. Not ported: GRPO's `normalize_then_sum` multi-reward
aggregation, RLOO's `normalize_advantages` and `reward_clip_range`, and RLOO's KL-in-reward
(beta > 0; TRL's RLOO default beta is 0.05, here the KL is the policy loss's k3 term).

Rewards are `[n]` with n = n_prompts * group_size, prompt-major: the group_size completions of
prompt 0 first, then those of prompt 1, ... A NaN reward marks a completion no reward function
could score: as in TRL it is left out of its group's mean and std and gets advantage 0.
Standard deviations are unbiased (Bessel's n - 1), as TRL's `nanstd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError

SCALES: tuple[str, ...] = ("group", "batch", "none")


def _grouped(fn: str, rewards: jax.Array, group_size: int) -> jax.Array:
  """`[n]` rewards as `[n_prompts, group_size]` float32; ConfigError on a bad shape."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ConfigError(f"{fn}: rewards must be 1-D [n_prompts * group_size], got shape "
                      f"{rewards.shape}.")
  if not isinstance(group_size, int) or group_size < 1:
    raise ConfigError(f"{fn}: group_size must be a positive int (completions per prompt), got "
                      f"{group_size!r}.")
  n = rewards.shape[0]
  if n == 0 or n % group_size:
    raise ConfigError(f"{fn}: {n} rewards do not split into groups of group_size={group_size}; "
                      f"pass all group_size completions of every prompt, prompt-major.")
  return rewards.reshape(-1, group_size)


def _nanstd(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
  """TRL's `nanstd`: unbiased std over the non-NaN entries; NaN when fewer than 2."""
  count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * count / jnp.maximum(count - 1, 1)
  std = jnp.where(count > 1, jnp.sqrt(var), jnp.nan)
  return std if keepdims else jnp.squeeze(std, axis=axis)


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> jax.Array:
  """GRPO advantages `[n]`: each reward minus its group's mean, optionally scaled by a std.

  "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
  (arXiv:2402.03300), Sec. 4.1.2 (outcome supervision), with TRL's `scale_rewards`:

    A_i = (r_i - mean(r_group)) / (std + eps)

  where std is the unbiased std of the group (scale='group', TRL's default), of the whole batch
  (scale='batch', "Tricks or Traps? A Deep Dive into RL for LLM Reasoning" (arXiv:2508.08221);
  the group mean is still subtracted), or no division at all (scale='none', Dr. GRPO
  "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv:2503.20783)). eps is
  added to the std, not under the square root, as TRL does; a group whose rewards are all equal
  gets advantage 0 (see `zero_spread_groups`).

  Args:
    rewards: `[n_prompts * group_size]`, prompt-major; NaN = unscorable (advantage 0).
    group_size: completions per prompt (TRL's num_generations).
    scale: 'group', 'batch' or 'none'.
    eps: added to the std before dividing.
  """
  fn = "group_advantages"
  if scale not in SCALES:
    raise ConfigError(f"{fn}: scale {scale!r} is unknown; use one of {SCALES}.")
  grouped = _grouped(fn, rewards, group_size)
  if scale == "group" and group_size < 2:
    raise ConfigError(f"{fn}: scale='group' divides by the std of each group, which needs "
                      f"group_size >= 2 (got {group_size}); sample more completions per prompt "
                      f"or use scale='batch' or 'none'.")
  if scale == "batch" and grouped.size < 2:
    raise ConfigError(f"{fn}: scale='batch' needs at least 2 rewards to take a std, got "
                      f"{grouped.size}; use scale='none'.")
  if not eps > 0:
    raise ConfigError(f"{fn}: eps must be > 0 (it keeps a zero-spread group finite), got {eps}.")
  advantages = grouped - jnp.nanmean(grouped, axis=1, keepdims=True)
  if scale == "group":
    advantages = advantages / (_nanstd(grouped, axis=1, keepdims=True) + eps)
  elif scale == "batch":
    advantages = advantages / (_nanstd(grouped) + eps)
  # Unscorable completions (NaN reward) carry no signal; TRL's nan_to_num(nan=0).
  return jnp.where(jnp.isnan(advantages), 0.0, advantages).reshape(-1)


def leave_one_out_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """RLOO advantages `[n]`: each reward minus the mean of the other rewards of its group.

  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
  LLMs" (arXiv:2402.14740), Eq. (6) (from Kool et al., 2019):

    A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean(r_group))

  As TRL's `RLOOTrainer` (with its default `normalize_advantages=False`), NaN rewards are left
  out of the baseline (divisor = scorable siblings) and get advantage 0, as does a completion
  with no scorable sibling.

  Args:
    rewards: `[n_prompts * group_size]`, prompt-major; NaN = unscorable.
    group_size: completions per prompt, >= 2 (one completion has no one to leave out).
  """
  fn = "leave_one_out_advantages"
  grouped = _grouped(fn, rewards, group_size)
  if group_size < 2:
    raise ConfigError(f"{fn}: the leave-one-out baseline needs group_size >= 2, got "
                      f"{group_size}; sample more completions per prompt.")
  count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
  total = jnp.nansum(grouped, axis=1, keepdims=True)
  advantages = grouped - (total - grouped) / (count - 1)
  # NaN rows and 0/0 (a single scorable completion) become 0, as TRL's nan_to_num.
  advantages = jnp.where(jnp.isfinite(advantages), advantages, 0.0)
  return advantages.reshape(-1)


def zero_spread_groups(rewards: jax.Array, group_size: int, *, atol: float = 1e-8) -> jax.Array:
  """`[n_prompts]` bool: True for groups whose rewards are all equal (within atol).

  Such a group has all-zero advantages under GRPO and RLOO, so it adds no gradient, only
  dilutes the batch: DAPO's dynamic sampling ("DAPO: An Open-Source LLM Reinforcement Learning
  System at Scale" (arXiv:2503.14476), Eq. (11), 0 < |{correct}| < G) drops these groups and
  samples more prompts. TRL logs their fraction as `frac_reward_zero_std`. NaN rewards are
  ignored; a group with fewer than 2 scorable rewards counts as zero-spread (it has no signal;
  TRL's metric, isclose(nanstd, 0), does not count it, its std being NaN).

  Args:
    rewards: `[n_prompts * group_size]`, prompt-major.
    group_size: completions per prompt.
    atol: largest max - min spread still counted as equal.
  """
  grouped = _grouped("zero_spread_groups", rewards, group_size)
  finite = ~jnp.isnan(grouped)
  hi = jnp.max(jnp.where(finite, grouped, -jnp.inf), axis=1)
  lo = jnp.min(jnp.where(finite, grouped, jnp.inf), axis=1)
  return ~jnp.any(finite, axis=1) | (hi - lo <= atol)
