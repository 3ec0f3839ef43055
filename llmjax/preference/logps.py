"""Per-sequence log-probabilities of preference pairs from packed rows.

A preference batch (`llmjax.data.preferences`) packs whole pairs into rows: each sequence
(prompt + chosen, prompt + rejected) is its own segment, `pair_slot` says which pair of the
row a token belongs to and `chosen` which of its two sequences. Summing a per-token quantity
over each sequence's completion tokens gives `[rows, max_pairs]` arrays, one entry per pair
slot; `valid` marks the slots that hold a pair.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax.data.preferences import pair_valid, sequence_sums
from llmjax.preference import losses
from llmjax.train.losses import TokenStats, token_stats


class PairLogps(NamedTuple):
  """Sums over completion tokens, each `[rows, max_pairs]` float32 (0 in empty slots)."""
  chosen: jax.Array
  rejected: jax.Array
  chosen_lengths: jax.Array  # completion token counts
  rejected_lengths: jax.Array
  valid: jax.Array  # bool: the slot holds a pair
  # WPO's pair weight w_chosen * w_rejected (gradient stopped), when asked for.
  weights: jax.Array | None = None

  def flat(self) -> "PairLogps":
    """Every field as `[rows * max_pairs]`, exactly 0 in empty slots (the losses clamp
    lengths at 1, so length-normalised terms stay finite there; they are masked out)."""
    valid = self.valid.reshape(-1)
    fix = lambda x: None if x is None else jnp.where(valid, x.reshape(-1), 0.0)
    return PairLogps(fix(self.chosen), fix(self.rejected), fix(self.chosen_lengths),
                     fix(self.rejected_lengths), valid, fix(self.weights))


def token_logps(model, batch: dict[str, jax.Array], chunk_size: int = 0) -> jax.Array:
  """`[rows, seq]` float32 log p(target | prefix) under `model`, 0 off the completions.

  `chunk_size > 0` (`TrainConfig.loss_chunk_size`) projects that many positions at a time
  (`llmjax.train.losses.token_stats`): the `[rows, seq, vocab]` logits never exist at once.
  """
  return _token_stats(model, batch, chunk_size).logps


def _token_stats(model, batch, chunk_size: int, sum_sq_probs: bool = False) -> TokenStats:
  """`token_stats` of the batch's targets, log-probs 0 off the completions."""
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  stats = token_stats(model, hidden, batch["targets"], chunk_size, sum_sq_probs=sum_sq_probs)
  return stats._replace(logps=stats.logps * batch["loss_mask"].astype(jnp.float32))


def pair_logps(model, batch: dict[str, jax.Array], max_pairs: int, chunk_size: int = 0,
               wpo_weights: bool = False) -> PairLogps:
  """The chosen and rejected completion log-probs of every pair in `batch` under `model`
  (`chunk_size`: as `token_logps`); with `wpo_weights`, also each pair's WPO weight
  (`llmjax.preference.losses.wpo_weights`, TRL's `use_weighting`) from the same pass."""
  stats = _token_stats(model, batch, chunk_size, sum_sq_probs=wpo_weights)
  chosen, rejected = sequence_sums(stats.logps, batch, max_pairs)
  out = _with_lengths(chosen, rejected, batch, max_pairs)
  if wpo_weights:
    aligned = (stats.logps - stats.log_sum_sq_probs) * batch["loss_mask"].astype(jnp.float32)
    a_c, a_r = sequence_sums(aligned, batch, max_pairs)
    out = out._replace(weights=losses.wpo_sequence_weights(a_c, out.chosen_lengths)
                       * losses.wpo_sequence_weights(a_r, out.rejected_lengths))
  return out


def reference_from_batch(batch: dict[str, jax.Array], max_pairs: int) -> PairLogps:
  """Reference log-probs precomputed into the batch (`ref_logps`, see
  `llmjax.stages.preference_reference`)."""
  chosen, rejected = sequence_sums(batch["ref_logps"], batch, max_pairs)
  return _with_lengths(chosen, rejected, batch, max_pairs)


def _with_lengths(chosen, rejected, batch, max_pairs) -> PairLogps:
  c_len, r_len = sequence_sums(batch["loss_mask"].astype(jnp.float32), batch, max_pairs)
  return PairLogps(chosen, rejected, c_len, r_len, pair_valid(batch, max_pairs))
