"""Distillation losses as pure jax functions, defined as TRL 1.16.0 defines them.

Source: TRL 1.16.0 (the released wheel): `GKDTrainer.generalized_jsd_loss` in
`trl/experimental/gkd/gkd_trainer.py`, and the same divergence in the newer, now stable
`DistillationTrainer` (`trl/trainer/distillation_trainer.py`, whose chunked Triton kernel
`trl/kernels/chunked_divergence.py` computes it from hidden states). The two agree term for
term; this module follows GKD's function, the one written in plain tensor ops, and the
`DistillationTrainer`'s reduction (sum over trained tokens / their count).

The generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, Eq. 1), per position,
between the teacher's p_T and the student's p_S with the mixture m = beta p_T + (1 - beta) p_S:

    JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)

TRL special-cases the ends, and so does this module:

    beta = 0: KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   the forward KL (mass-covering)
    beta = 1: KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)   the reverse KL (mode-seeking)

(torch's `F.kl_div(input, target)` is KL(target || input), hence TRL's swapped-looking calls.)
These are not the formula's limits, which go to 0: JSD_beta ~ beta KL(p_T || p_S) as beta -> 0
and ~ (1 - beta) KL(p_S || p_T) as beta -> 1, so the divergence (and the gradient's scale)
jumps at both ends; TRL's `beta` default is 0.5 in GKD and 1.0 (reverse KL) in
`DistillationTrainer`. The mixture is formed in log space (logaddexp of the two log-probs
plus log(beta), log1p(-beta)), as TRL does.

Temperature T divides both models' logits before the softmax, and the divergence is then
multiplied by T^2 (Hinton et al. 2015): the gradient with respect to the student's logits is
(1/T) (p_S - p_T) for the forward KL, and at high T that difference of two softened
distributions shrinks like 1/T too, so without the T^2 the distillation term's gradient would
fall as 1/T^2 against the next-token term it is mixed with. TRL does not scale (its T only sharpens or flattens; `GKDTrainer.compute_loss` does not
even pass its `temperature`, a sampling setting, to the loss, while `DistillationTrainer`
does); at T = 1 the numbers are TRL's, at T != 1 they are TRL's times T^2.

Reduction: every function returns (sum over trained positions, count of trained positions),
the train loop's convention, so microbatches and devices add up exactly. sum / count is TRL's
value: GKD's `reduction='batchmean'` with `labels` divides the masked positions' sum by their
number (a per-token mean, despite the name; without labels it would divide by the batch size),
and `DistillationTrainer` divides by the batch's valid-token count (`num_items_in_batch`).

Gradients flow to the student only: the teacher's logits are gradient-stopped, as TRL runs
the teacher under `torch.no_grad()`. Everything is computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError
from llmjax.train.losses import target_weights, token_cross_entropy

# TRL's `_add_tail_bucket` clamps the top-k mass below 1 by this, so the tail's log stays finite.
_TAIL_EPS = 1e-7


def check_settings(fn: str, *, beta: float, temperature: float, top_k: int = 0,
                   alpha: float | None = None) -> None:
  """Raises ConfigError, naming the setting, for values the losses cannot use."""
  if not 0.0 <= beta <= 1.0:
    raise ConfigError(f"{fn}: beta must lie in [0, 1] (0 forward KL, 0.5 JSD, 1 reverse KL); "
                      f"got {beta}")
  if not temperature > 0.0:
    raise ConfigError(f"{fn}: temperature must be positive (1.0 leaves the logits as they are); "
                      f"got {temperature}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ConfigError(f"{fn}: top_k must be an int >= 0 (0 uses the whole vocabulary); "
                      f"got {top_k!r}")
  if alpha is not None and not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"{fn}: alpha (the next-token loss's weight; the divergence gets "
                      f"1 - alpha) must lie in [0, 1]; got {alpha}")


def _divergence(log_s: jax.Array, log_t: jax.Array, beta: float) -> jax.Array:
  """TRL's generalized JSD over the last axis of two normalized log-distributions."""
  if beta == 0.0:
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  if beta == 1.0:
    return jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)
  log_m = jnp.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
  kl_teacher = jnp.exp(log_t) * (log_t - log_m)
  kl_student = jnp.exp(log_s) * (log_s - log_m)
  return jnp.sum(beta * kl_teacher + (1.0 - beta) * kl_student, axis=-1)


def _with_tail(log_p: jax.Array) -> jax.Array:
  """`[..., k]` log-probs -> `[..., k + 1]`: the mass outside the k tokens as one more entry."""
  covered = jnp.minimum(jax.nn.logsumexp(log_p, axis=-1, keepdims=True), -_TAIL_EPS)
  return jnp.concatenate([log_p, jnp.log(-jnp.expm1(covered))], axis=-1)


def top_k_support(log_s: jax.Array, log_t: jax.Array, k: int,
                  tail: bool = True) -> tuple[jax.Array, jax.Array]:
  """Both `[..., vocab]` log-distributions restricted to the teacher's k likeliest tokens.

  The teacher's top-k log-probs and the student's log-probs at the same ids (both normalized
  over the whole vocabulary first), then either (`tail=True`) one more entry holding the mass
  outside those k tokens, log(1 - sum), with the sum clamped below 1 by 1e-7 -- TRL 1.16's
  `ServerDistillationTrainer` with its default `loss_add_tail=True`, which keeps k = 1
  meaningful -- or (`tail=False`) both renormalized over the k tokens, its `loss_add_tail=False`
  (at k = 1 that divergence is always 0). k >= vocab keeps every token.
  Returns `[..., k + 1]` (tail) or `[..., k]` log-probs: (student, teacher).
  """
  k = min(k, log_t.shape[-1])
  top_t, ids = jax.lax.top_k(log_t, k)
  top_s = jnp.take_along_axis(log_s, ids, axis=-1)
  if tail:
    return _with_tail(top_s), _with_tail(top_t)
  renorm = lambda x: x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
  return renorm(top_s), renorm(top_t)


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float,
                     temperature: float = 1.0, top_k: int = 0,
                     top_k_tail: bool = True) -> jax.Array:
  """Per-position T^2-scaled generalized JSD: `[..., vocab]` logits -> `[...]` float32.

  `top_k > 0` computes it over the teacher's top-k tokens only (see `top_k_support`): cheaper
  to store when the teacher's outputs are kept, and an approximation -- the reverse KL and the
  JSD then ignore student mass on tokens outside the teacher's top k, except through the tail.
  """
  check_settings("token_divergence", beta=beta, temperature=temperature, top_k=top_k)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  if top_k:
    log_s, log_t = top_k_support(log_s, log_t, top_k, top_k_tail)
  return temperature ** 2 * _divergence(log_s, log_t, beta)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                    beta: float, temperature: float = 1.0, top_k: int = 0,
                    top_k_tail: bool = True) -> tuple[jax.Array, jax.Array]:
  """TRL's generalized JSD over the masked positions: (sum, count).

  Args:
    student_logits: `[batch, seq, vocab]`, any float dtype; the gradient flows here.
    teacher_logits: `[batch, seq, vocab]`, same vocabulary; gradient-stopped.
    mask: `[batch, seq]`, 1 (or a weight) where a position is trained, 0 where it does not
      count (its logits may hold anything finite).
    beta: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), else the JSD
      with mixture beta p_teacher + (1 - beta) p_student.
    temperature: T; both logits are divided by T and the divergence multiplied by T^2.
    top_k, top_k_tail: 0 for the whole vocabulary, else see `top_k_support`.
  Returns:
    (sum of mask-weighted per-position divergences, sum of the mask), float32 scalars;
    sum / count is TRL's `generalized_jsd_loss(..., labels)` times T^2.
  """
  per_token = token_divergence(student_logits, teacher_logits, beta=beta,
                               temperature=temperature, top_k=top_k, top_k_tail=top_k_tail)
  weights = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(weights != 0, per_token * weights, 0.0)), jnp.sum(weights)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
               temperature: float = 1.0, top_k: int = 0,
               top_k_tail: bool = True) -> tuple[jax.Array, jax.Array]:
  """KL(teacher || student) over the masked positions: `generalized_jsd` with beta = 0."""
  return generalized_jsd(student_logits, teacher_logits, mask, beta=0.0,
                         temperature=temperature, top_k=top_k, top_k_tail=top_k_tail)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
               temperature: float = 1.0, top_k: int = 0,
               top_k_tail: bool = True) -> tuple[jax.Array, jax.Array]:
  """KL(student || teacher) over the masked positions: `generalized_jsd` with beta = 1."""
  return generalized_jsd(student_logits, teacher_logits, mask, beta=1.0,
                         temperature=temperature, top_k=top_k, top_k_tail=top_k_tail)


def distill_loss(student, teacher, batch: dict[str, jax.Array], *, beta: float,
                 temperature: float = 1.0, alpha: float = 0.0, chunk_size: int = 0,
                 top_k: int = 0, top_k_tail: bool = True,
                 reference_rows: jax.Array | None = None):
  """alpha * next-token CE + (1 - alpha) * generalized JSD on a packed batch, in the train
  loop's convention: (loss sum, trained-position count, {name: (sum, count)}).

  Args:
    student: the trained model (`hidden_states(tokens, positions, segment_ids)` and
      `logits(hidden)`, like `llmjax.model.transformer.Transformer`).
    teacher: a frozen model with the same vocabulary and any width or depth; its outputs
      are gradient-stopped.
    batch: packed rows, `[batch, seq]` each: `tokens`, `positions`, `segment_ids`, `targets`
      and `loss_mask`; the trained positions are `train.losses.target_weights(batch)`, as
      for `lm_loss`.
    beta, temperature, top_k, top_k_tail: the divergence, as in `generalized_jsd`.
    alpha: the weight of the ordinary next-token cross-entropy (at temperature 1, against
      `targets`); the divergence gets 1 - alpha. 0, the default, is pure distillation, TRL's
      GKD/DistillationTrainer loss (which have no next-token term).
    chunk_size: 0 projects every position at once; > 0 runs both models' output layers over
      `chunk_size` positions at a time inside a scan, recomputed in the backward pass, so the
      `[batch, seq, vocab]` logits of neither model exist at full length (the hidden states,
      `[batch, seq, d_model]`, do). seq must be a multiple of it.
    reference_rows: `[batch]`, 1 where a row's targets are reference text and 0 where they
      were sampled from the student (on-policy rows, GKD): the next-token term and both CE
      metrics count reference rows only, since the likelihood of the student's own sample
      is no target to fit; the divergence counts every row. None: every row is reference.
  Returns:
    (alpha * ce_sum + (1 - alpha) * jsd_sum, count, aux) with aux `jsd`, `ce` (the
    student's next-token loss) and `teacher_ce` (the teacher's), each a (sum, count) pair
    (the CE pairs over reference rows); all float32 scalars. `count` is every trained
    position, so a sampled row's tokens weigh (1 - alpha) * JSD in the mean.
  """
  check_settings("distill_loss", beta=beta, temperature=temperature, top_k=top_k, alpha=alpha)
  s_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
  t_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
  if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
    raise ConfigError(f"distill_loss: the teacher's vocabulary ({t_vocab} tokens) differs from "
                      f"the student's ({s_vocab}); distillation compares distributions over the "
                      "same token ids: use a teacher with the student's tokenizer")
  seq_len = batch["tokens"].shape[1]
  if chunk_size < 0 or (chunk_size and seq_len % chunk_size):
    raise ConfigError(f"distill_loss: seq_len {seq_len} is not a multiple of the loss chunk_size "
                      f"{chunk_size}; pick a chunk_size that divides it (or 0 for no chunks)")
  weights = target_weights(batch)
  ce_weights = (weights if reference_rows is None
                else weights * reference_rows.astype(jnp.float32)[:, None])
  inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
  student_hidden = student.hidden_states(*inputs)
  teacher_hidden = jax.lax.stop_gradient(teacher.hidden_states(*inputs))

  def sums(h_s, h_t, targets, w, ce_w):
    s_logits = student.logits(h_s)
    t_logits = jax.lax.stop_gradient(teacher.logits(h_t))
    jsd, _ = generalized_jsd(s_logits, t_logits, w, beta=beta, temperature=temperature,
                             top_k=top_k, top_k_tail=top_k_tail)
    ce, _ = token_cross_entropy(s_logits, targets, ce_w)
    teacher_ce, _ = token_cross_entropy(t_logits, targets, ce_w)
    return jnp.stack([jsd, ce, teacher_ce])

  xs = (student_hidden, teacher_hidden, batch["targets"], weights, ce_weights)
  if not chunk_size:
    totals = sums(*xs)
  else:
    b, s = weights.shape
    split = lambda x: x.reshape((b, s // chunk_size, chunk_size) + x.shape[2:]).swapaxes(0, 1)
    chunk_sums = jax.checkpoint(sums)
    totals, _ = jax.lax.scan(lambda carry, x: (carry + chunk_sums(*x), None),
                             jnp.zeros((3,), jnp.float32), tuple(split(x) for x in xs))
  jsd, ce, teacher_ce = totals[0], totals[1], totals[2]
  count, ce_count = jnp.sum(weights), jnp.sum(ce_weights)
  loss = alpha * ce + (1.0 - alpha) * jsd
  return loss, count, {"jsd": (jsd, count), "ce": (ce, ce_count),
                       "teacher_ce": (teacher_ce, ce_count)}
