"""Preference losses as pure jax functions, defined as TRL defines them.

Source: TRL 1.16.0 (the release wheel): `trl/trainer/dpo_trainer.py` (`DPOTrainer._compute_loss`
and the loss-type checks in `DPOTrainer.__init__`), `trl/experimental/cpo/cpo_trainer.py`
(`CPOTrainer.cpo_loss`), `trl/experimental/orpo/orpo_trainer.py` (`ORPOTrainer.odds_ratio_loss`)
and `trl/trainer/reward_trainer.py` (`RewardTrainer.compute_loss`); checked against that code in
`tests/preference/test_trl116_dpo.py`. TRL 1.16 changed two things since 1.10: the
f-divergence scores keep f'(t)'s constants (they matter where the scores are divided by
lengths: ipo, sigmoid_norm), and a non-default f_divergence_type is rejected for the loss types
not built on the chosen-rejected score difference (nca_pair, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down use the plain log-ratios). Not ported: LD-DPO's `ld_alpha`
(a per-token weighting of the logps, the caller's business), CPO's sigmoid/hinge/ipo loss types
without a reference (SimPO with gamma = 0 is CPO's sigmoid).

One deliberate difference: TRL >= 0.29 (1.16 included) ignores `label_smoothing` for
`loss_type='sigmoid'`; here it is the conservative DPO (cDPO) smoothing that TRL <= 0.28
applied, so `label_smoothing=0` (the default) gives TRL 1.16's numbers and a non-zero value is
not silently dropped. Elsewhere the numbers differ only where TRL's overflow to inf/NaN (discopop
at very negative margins, ORPO at an average logp of 0), and settings TRL ignores or rejects
later (label_smoothing on types that do not use it) raise ConfigError.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_TYPES: tuple[str, ...] = (
    "reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types a non-default f-divergence applies to (TRL 1.16): f-DPO's reparameterisation
# leaves a beta log Z(x) term that cancels only in the chosen-rejected score difference.
F_DIVERGENCE_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")

# label_smoothing is the label-flip probability for these (cDPO / Robust DPO): at 0.5 the
# labels carry no information and robust divides by zero.
_FLIP_SMOOTHED = ("sigmoid", "robust", "aot", "aot_unpaired")
# Types that sort over the batch: per-pair (WPO) weights would land on the wrong pairs.
_SORTED = ("aot", "aot_unpaired")
# Per-token averages clamp lengths at 1, as TRL does, so an empty completion does not divide by 0.
_MIN_LENGTH = 1.0
# ORPO's log(1 - p) is -inf at p = 1; average logps are capped just below 0 to keep it finite.
_MAX_AVG_LOGP = -1e-6


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_beta(fn: str, name: str, beta: float) -> None:
  if not beta > 0:
    raise ConfigError(f"{fn}: {name} must be > 0, got {beta}; it scales the log-ratio "
                      f"(0.1 is the usual value).")


def _check_flip_probability(fn: str, label_smoothing: float, what: str) -> None:
  if not 0.0 <= label_smoothing < 0.5:
    raise ConfigError(f"{fn}: label_smoothing is the probability that a preference label is "
                      f"flipped for {what} and must lie in [0, 0.5), got {label_smoothing}.")


def _smoothed_sigmoid(logits: jax.Array, eps: float) -> jax.Array:
  """cDPO: the logistic loss on a label that is wrong with probability `eps`."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def dpo_rewards(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                ref_rejected_logps: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """The implicit DPO rewards TRL logs as `rewards/chosen` and `rewards/rejected`.

  `beta * (logp - ref_logp)`, gradient stopped (they are metrics). Inputs `[batch]` sums of
  completion-token logps; returns (chosen_rewards `[batch]`, rejected_rewards `[batch]`).
  `rewards/margins` is their difference and `rewards/accuracies` the mean of `chosen > rejected`.
  """
  _check_beta("dpo_rewards", "beta", beta)
  chosen = beta * (_f32(chosen_logps) - _f32(ref_chosen_logps))
  rejected = beta * (_f32(rejected_logps) - _f32(ref_rejected_logps))
  return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def f_divergence_scores(chosen_logratios: jax.Array, rejected_logratios: jax.Array,
                        f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Scores f'(pi/pi_ref) that replace the log-ratios under an f-divergence regulariser.

  "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
  Constraints" (arXiv:2309.16240). With u = logp - ref_logp `[batch]` and t = exp(u), as TRL 1.16
  (constants kept): reverse_kl u (= log t); forward_kl 1 - exp(-u) (= 1 - 1/t); js_divergence
  log 2 + log sigmoid(u) (= log(2t / (1 + t))); alpha_divergence (exp((a - 1) u) - 1) / (a - 1)
  (= (t^(a-1) - 1) / (a - 1)), which is u again at a = 1 (|a - 1| < 1e-6, as TRL).
  """
  if f_divergence_type == "reverse_kl":
    return chosen_logratios, rejected_logratios
  if f_divergence_type == "forward_kl":
    return -jnp.expm1(-chosen_logratios), -jnp.expm1(-rejected_logratios)
  if f_divergence_type == "js_divergence":
    score = lambda u: 0.6931471805599453 + jax.nn.log_sigmoid(u)  # log 2 + log sig(u)
    return score(chosen_logratios), score(rejected_logratios)
  if f_divergence_type == "alpha_divergence":
    a = f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
      return chosen_logratios, rejected_logratios
    # TRL's float32 cap on the exponent, so exp() stays finite.
    score = lambda u: jnp.expm1(jnp.minimum((a - 1.0) * u, 80.0)) / (a - 1.0)
    return score(chosen_logratios), score(rejected_logratios)
  raise ConfigError(f"f_divergence_type {f_divergence_type!r} is unknown; use one of "
                    f"{F_DIVERGENCE_TYPES}.")


def wpo_weights(token_logps: jax.Array, log_sum_sq_probs: jax.Array,
                completion_mask: jax.Array) -> jax.Array:
  """Per-sequence WPO weights, TRL's `use_weighting=True` (gradient stopped).

  "WPO: Enhancing RLHF with Weighted Preference Optimization" (arXiv:2406.11827), Eq. (2) with
  TRL's alignment: w = exp(mean_t [logp_t - log sum_v p_v,t^2]), where log sum_v p_v^2 =
  logsumexp(2 z_t) - 2 logsumexp(z_t) of the logits z_t (TRL's `log_sum_sq_probs`; per token
  from `llmjax.train.losses.token_stats(..., sum_sq_probs=True)`, chunked or not, or
  `logit_stats` of logits). Args: token_logps, log_sum_sq_probs, completion_mask (1 on
  completion tokens), each `[n, seq]`. Returns `[n]`; a pair's weight for
  `dpo_loss(pair_weights=...)` is `w_chosen * w_rejected`.
  """
  mask = _f32(completion_mask)
  aligned = (_f32(token_logps) - _f32(log_sum_sq_probs)) * mask
  return wpo_sequence_weights(aligned.sum(-1), mask.sum(-1))


def wpo_sequence_weights(aligned_sums: jax.Array, lengths: jax.Array) -> jax.Array:
  """`wpo_weights` from per-sequence sums of logp_t - log sum_v p_v,t^2 over the completion
  and the completion lengths (any matching shape; packed rows sum them per segment):
  exp(sum / max(length, 1)), gradient stopped."""
  mean = _f32(aligned_sums) / jnp.maximum(_f32(lengths), _MIN_LENGTH)
  return jax.lax.stop_gradient(jnp.exp(mean))


def _check_dpo_args(loss_types: tuple[str, ...], loss_weights: Sequence[float] | None,
                    beta: float, label_smoothing: float, chosen_lengths: jax.Array | None,
                    rejected_lengths: jax.Array | None, discopop_tau: float,
                    pair_weights: jax.Array | None, f_divergence_type: str) -> list[float]:
  """Raises ConfigError for a bad `dpo_loss` configuration; returns one weight per loss type."""
  fn = "dpo_loss"
  if not loss_types:
    raise ConfigError(f"{fn}: loss_type is empty; give at least one of {LOSS_TYPES}.")
  for t in loss_types:
    if t not in LOSS_TYPES:
      raise ConfigError(f"{fn}: loss_type {t!r} is unknown; use one of {LOSS_TYPES}.")
  weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
  if len(weights) != len(loss_types):
    raise ConfigError(f"{fn}: loss_weights has {len(weights)} entries for {len(loss_types)} loss "
                      f"types {loss_types}; give one weight per type (or none for all 1.0).")
  _check_beta(fn, "beta", beta)
  for t in loss_types:
    if t in _FLIP_SMOOTHED:
      _check_flip_probability(fn, label_smoothing, f"loss_type {t!r}")
  if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
    raise ConfigError(f"{fn}: loss_type 'exo_pair' needs label_smoothing (EXO's epsilon) in "
                      f"(0, 1), got {label_smoothing}; the EXO paper recommends 1e-3.")
  if label_smoothing != 0.0 and not set(loss_types) & {*_FLIP_SMOOTHED, "exo_pair"}:
    raise ConfigError(f"{fn}: label_smoothing={label_smoothing} has no effect on loss types "
                      f"{loss_types}; set it to 0 or use one of {(*_FLIP_SMOOTHED, 'exo_pair')}.")
  for t in loss_types:
    if t in ("ipo", "sigmoid_norm") and (chosen_lengths is None or rejected_lengths is None):
      raise ConfigError(f"{fn}: loss_type {t!r} averages the log-ratios per completion token; "
                        f"pass chosen_lengths and rejected_lengths (completion token counts).")
    if t == "sft" and chosen_lengths is None:
      raise ConfigError(f"{fn}: loss_type 'sft' is a per-token NLL; pass chosen_lengths "
                        f"(completion token counts).")
  if "discopop" in loss_types and not discopop_tau > 0:
    raise ConfigError(f"{fn}: discopop_tau must be > 0, got {discopop_tau}; the DiscoPOP paper "
                      f"uses 0.05.")
  if f_divergence_type not in F_DIVERGENCE_TYPES:
    raise ConfigError(f"{fn}: f_divergence_type {f_divergence_type!r} is unknown; use one of "
                      f"{F_DIVERGENCE_TYPES}.")
  other = [t for t in loss_types if t not in F_DIVERGENCE_LOSS_TYPES]
  if f_divergence_type != "reverse_kl" and other:
    raise ConfigError(f"{fn}: f_divergence_type={f_divergence_type!r} applies only to loss types "
                      f"{F_DIVERGENCE_LOSS_TYPES} (their log Z(x) term cancels in the chosen - "
                      f"rejected difference), not {other}; use f_divergence_type='reverse_kl' "
                      f"with those, as TRL 1.16 requires.")
  if pair_weights is not None and set(loss_types) & set(_SORTED):
    raise ConfigError(f"{fn}: pair_weights cannot be used with {_SORTED}: those losses sort the "
                      f"batch, so a pair's weight would land on another pair. Drop one of them.")
  return weights


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, *, loss_type: str | Sequence[str] = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
             loss_weights: Sequence[float] | None = None, discopop_tau: float = 0.05,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             pair_weights: jax.Array | None = None) -> jax.Array:
  """Per-pair DPO-family loss `[batch]`, TRL's `DPOTrainer` loss for each `loss_type`.

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: `[batch]` sums of
      completion-token logps under the policy and the reference model.
    loss_type: one of `LOSS_TYPES`, or several, combined as sum_k loss_weights[k] * loss_k.
    beta: the inverse temperature; IPO's tau, the hinge's 1/margin.
    label_smoothing: label-flip probability for sigmoid (cDPO), robust, aot, aot_unpaired, in
      [0, 0.5); EXO's epsilon for exo_pair, in (0, 1). Other types do not use it.
    chosen_lengths, rejected_lengths: `[batch]` completion token counts (clamped at 1); needed
      by ipo and sigmoid_norm (both) and sft (chosen).
    loss_weights: one float per loss type; default all 1.0.
    discopop_tau: DiscoPOP's temperature.
    f_divergence_type, f_alpha_divergence_coef: see `f_divergence_scores`; a non-default
      type only with the `F_DIVERGENCE_LOSS_TYPES`.
    pair_weights: `[batch]` multiplier on every type's per-pair loss: TRL's `use_weighting`
      with `wpo_weights(chosen) * wpo_weights(rejected)`.

  Notation: u_c = logp_c - ref_c, u_r = logp_r - ref_r, s = the f-divergence scores of u
  (s = u for the default reverse_kl, the only choice for the types written with u), d =
  s_c - s_r, L = lengths, sig = sigmoid, eps = label_smoothing. Per type:

  - sigmoid, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
    (arXiv:2305.18290); with eps, cDPO (E. Mitchell, "A note on DPO with noisy preferences &
    relationship to IPO", 2023): -(1-eps) log sig(beta d) - eps log sig(-beta d).
  - hinge, SLiC-HF "Sequence Likelihood Calibration with Human Feedback" (arXiv:2305.10425)
    as used by RSO (arXiv:2309.06657): max(0, 1 - beta d).
  - ipo, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv:2310.12036), Eq. 17 on per-token scores: (s_c/L_c - s_r/L_r - 1/(2 beta))^2.
  - exo_pair, "Towards Efficient Exact Optimization of Language Model Alignment"
    (arXiv:2402.00856), Eq. 16: sig(beta d)(log sig(beta d) - log(1-eps))
    + sig(-beta d)(log sig(-beta d) - log eps).
  - nca_pair, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (arXiv:2402.05369): -log sig(beta u_c) - 0.5 log sig(-beta u_c) - 0.5 log sig(-beta u_r).
  - robust, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
    (arXiv:2403.00409): (-(1-eps) log sig(beta d) + eps log sig(-beta d)) / (1 - 2 eps).
  - bco_pair, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv:2404.04656): -log sig(beta u_c) - log sig(-beta u_r). TRL 1.x dropped the running
    reward mean of older versions, so there is no delta here.
  - sppo_hard, "Self-Play Preference Optimization for Language Model Alignment"
    (arXiv:2405.00675), hard labels: (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2.
  - aot / aot_unpaired, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv:2406.05882): the smoothed sigmoid on beta * x with x = sort(logp_c - logp_r) -
    sort(ref_c - ref_r) (aot), or x = sort(u_c) - sort(u_r) (aot_unpaired); sorted over the
    batch, so pair i's loss is the i-th quantile's, not pair i's own.
  - apo_zero / apo_down, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv:2408.06266), Eqs. 7 and 8: apo_zero 1 - sig(beta u_c) + sig(beta u_r); apo_down
    sig(beta u_c) + 1 - sig(beta (u_c - u_r)).
  - discopop, "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (arXiv:2406.08414), Eq. 5, with l = beta d and m = sig(l / tau):
    -log sig(l) (1 - m) + exp(-l) m.
  - sft, the NLL term of MPO ("Enhancing the Reasoning Ability of Multimodal Large Language
    Models via Mixed Preference Optimization", arXiv:2411.10442): -sum(logp_c) / sum(L_c)
    over the whole batch (a per-token mean, as TRL's cross-entropy), the same value for every
    pair. Assumes chosen_logps are plain token sums.
  - sigmoid_norm, length-normalised DPO as in SimPO (arXiv:2405.14734), with the reference:
    -log sig(beta (s_c/L_c - s_r/L_r)).
  """
  loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  weights = _check_dpo_args(loss_types, loss_weights, beta, label_smoothing, chosen_lengths,
                            rejected_lengths, discopop_tau, pair_weights, f_divergence_type)
  logp_c, logp_r = _f32(chosen_logps), _f32(rejected_logps)
  ref_c, ref_r = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
  u_c, u_r = logp_c - ref_c, logp_r - ref_r
  s_c, s_r = f_divergence_scores(u_c, u_r, f_divergence_type, f_alpha_divergence_coef)
  d = s_c - s_r
  len_c = None if chosen_lengths is None else jnp.maximum(_f32(chosen_lengths), _MIN_LENGTH)
  len_r = None if rejected_lengths is None else jnp.maximum(_f32(rejected_lengths), _MIN_LENGTH)
  eps = label_smoothing
  log_sig = jax.nn.log_sigmoid

  def one(t: str) -> jax.Array:
    if t == "sigmoid":
      return _smoothed_sigmoid(beta * d, eps)
    if t == "hinge":
      return jax.nn.relu(1.0 - beta * d)
    if t == "ipo":
      return (s_c / len_c - s_r / len_r - 1.0 / (2.0 * beta)) ** 2
    if t == "exo_pair":
      z = beta * d
      return (jax.nn.sigmoid(z) * (log_sig(z) - jnp.log1p(-eps))
              + jax.nn.sigmoid(-z) * (log_sig(-z) - jnp.log(eps)))
    if t == "nca_pair":
      return -log_sig(beta * u_c) - 0.5 * log_sig(-beta * u_c) - 0.5 * log_sig(-beta * u_r)
    if t == "robust":
      return (-(1.0 - eps) * log_sig(beta * d) + eps * log_sig(-beta * d)) / (1.0 - 2.0 * eps)
    if t == "bco_pair":
      return -log_sig(beta * u_c) - log_sig(-beta * u_r)
    if t == "sppo_hard":
      return (u_c - 0.5 / beta) ** 2 + (u_r + 0.5 / beta) ** 2
    if t == "aot":
      return _smoothed_sigmoid(beta * (jnp.sort(logp_c - logp_r) - jnp.sort(ref_c - ref_r)), eps)
    if t == "aot_unpaired":
      return _smoothed_sigmoid(beta * (jnp.sort(u_c) - jnp.sort(u_r)), eps)
    if t == "apo_zero":
      return jax.nn.sigmoid(-beta * u_c) + jax.nn.sigmoid(beta * u_r)
    if t == "apo_down":
      return jax.nn.sigmoid(beta * u_c) + jax.nn.sigmoid(-beta * (u_c - u_r))
    if t == "discopop":
      z = beta * d
      m = jax.nn.sigmoid(z / discopop_tau)
      # exp(-z) * m as one exponent: exp(-z) overflows for very negative z where m is 0.
      return -log_sig(z) * (1.0 - m) + jnp.exp(-z + log_sig(z / discopop_tau))
    if t == "sft":
      # Token-weighted over the batch (TRL's cross-entropy), so empty rows add no tokens.
      nll = -logp_c.sum() / jnp.maximum(_f32(chosen_lengths).sum(), _MIN_LENGTH)
      return jnp.broadcast_to(nll, logp_c.shape)
    assert t == "sigmoid_norm", t
    return -log_sig(beta * (s_c / len_c - s_r / len_r))

  total = jnp.zeros_like(d)
  for t, w in zip(loss_types, weights):
    per_pair = one(t)
    if pair_weights is not None:
      per_pair = per_pair * _f32(pair_weights)
    total = total + w * per_pair
  return total


def simpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float,
               gamma: float, label_smoothing: float = 0.0, alpha: float = 0.0) -> jax.Array:
  """SimPO per-pair loss `[batch]`, TRL's `CPOTrainer` with `loss_type='simpo'`.

  "SimPO: Simple Preference Optimization with a Reference-Free Reward" (arXiv:2405.14734),
  Eq. 6 with cDPO smoothing eps: with z = beta (a_c - a_r) - gamma,
  -(1-eps) log sig(z) - eps log sig(-z), where a = the average logp per completion token `[batch]`.

  `gamma` is the paper's target margin gamma, TRL's `simpo_gamma` (TRL subtracts
  simpo_gamma / beta before scaling by beta). The SimPO repo's `gamma_beta_ratio` is gamma / beta,
  so gamma = gamma_beta_ratio * beta. The full CPO/SimPO objective adds `cpo_alpha` times the
  chosen NLL (0 for SimPO/AlphaPO), which the stage computes.

  `alpha` != 0 is AlphaPO ("AlphaPO: Reward Shape Matters for LLM Alignment",
  arXiv:2501.03884): a is replaced by r = (1 - p^-alpha) / alpha with p = exp(a), as TRL's
  CPO `alpha`.
  """
  fn = "simpo_loss"
  _check_beta(fn, "beta", beta)
  _check_flip_probability(fn, label_smoothing, "SimPO")
  a_c, a_r = _f32(chosen_avg_logps), _f32(rejected_avg_logps)
  if alpha != 0.0:
    # 1 - p^-alpha = -expm1(-alpha * log p)
    a_c, a_r = -jnp.expm1(-alpha * a_c) / alpha, -jnp.expm1(-alpha * a_r) / alpha
  return _smoothed_sigmoid(beta * (a_c - a_r) - gamma, label_smoothing)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, split at -log 2 where each form loses the least precision."""
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *,
              lam: float) -> jax.Array:
  """ORPO's odds-ratio term per pair `[batch]`, the part TRL's `odds_ratio_loss` returns.

  "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv:2403.07691),
  Eqs. 4 and 7: -lam log sig(log odds(p_c) - log odds(p_r)), log odds(p) = a - log(1 - exp(a)),
  a = the average logp per completion token `[batch]`. `lam` is the paper's lambda, TRL's ORPO
  `beta` (default 0.1). TRL's loss is mean(chosen NLL) + mean(this); the stage adds the NLL.
  Average logps above -1e-6 are capped there, where log(1 - p) would be -inf.
  """
  if not lam >= 0:
    raise ConfigError(f"orpo_loss: lam must be >= 0, got {lam}; it weights the odds-ratio term "
                      f"(TRL's ORPO beta, 0.1 by default).")
  a_c = jnp.minimum(_f32(chosen_avg_logps), _MAX_AVG_LOGP)
  a_r = jnp.minimum(_f32(rejected_avg_logps), _MAX_AVG_LOGP)
  log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
  return -lam * jax.nn.log_sigmoid(log_odds)


def reward_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                margin: jax.Array | float | None = None,
                center_rewards_coefficient: float | None = None) -> jax.Array:
  """Bradley-Terry reward-model loss per pair `[batch]`, TRL's `RewardTrainer` loss.

  -log sig(r_c - r_r - margin) + c (r_c + r_r)^2 with r `[batch]` scalar rewards. The
  Bradley-Terry objective is from "Training language models to follow instructions with human
  feedback" (arXiv:2203.02155); the per-pair margin `[batch]` (or scalar) from "Llama 2: Open
  Foundation and Fine-Tuned Chat Models" (arXiv:2307.09288); the centering term with
  c = center_rewards_coefficient from "Helping or Herding? Reward Model Ensembles Mitigate but
  do not Eliminate Reward Hacking" (arXiv:2312.09244). The mean over pairs is TRL's loss.
  """
  if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
    raise ConfigError(f"reward_loss: center_rewards_coefficient must be >= 0 or None, got "
                      f"{center_rewards_coefficient}; it penalises rewards away from 0 (0.01 "
                      f"is the usual value).")
  r_c, r_r = _f32(chosen_rewards), _f32(rejected_rewards)
  diff = r_c - r_r
  if margin is not None:
    diff = diff - _f32(margin)
  loss = -jax.nn.log_sigmoid(diff)
  if center_rewards_coefficient is not None:
    loss = loss + center_rewards_coefficient * (r_c + r_r) ** 2
  return loss
