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
import optax

from llmjax.data.preferences import pair_valid, sequence_sums


class PairLogps(NamedTuple):
  """Sums over completion tokens, each `[rows, max_pairs]` float32 (0 in empty slots)."""
  chosen: jax.Array
  rejected: jax.Array
  chosen_lengths: jax.Array  # completion token counts
  rejected_lengths: jax.Array
  valid: jax.Array  # bool: the slot holds a pair

  def flat(self) -> "PairLogps":
    """Every field as `[rows * max_pairs]`, exactly 0 in empty slots (the losses clamp
    lengths at 1, so length-normalised terms stay finite there; they are masked out)."""
    valid = self.valid.reshape(-1)
    fix = lambda x: jnp.where(valid, x.reshape(-1), 0.0)
    return PairLogps(fix(self.chosen), fix(self.rejected), fix(self.chosen_lengths),
                     fix(self.rejected_lengths), valid)


def token_logps(model, batch: dict[str, jax.Array]) -> jax.Array:
  """`[rows, seq]` float32 log p(target | prefix) under `model`, 0 off the completions."""
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  logps = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])
  return logps * batch["loss_mask"].astype(jnp.float32)


def pair_logps(model, batch: dict[str, jax.Array], max_pairs: int) -> PairLogps:
  """The chosen and rejected completion log-probs of every pair in `batch` under `model`."""
  chosen, rejected = sequence_sums(token_logps(model, batch), batch, max_pairs)
  return _with_lengths(chosen, rejected, batch, max_pairs)


def reference_from_batch(batch: dict[str, jax.Array], max_pairs: int) -> PairLogps:
  """Reference log-probs precomputed into the batch (`ref_logps`, see
  `llmjax.stages.preference_reference`)."""
  chosen, rejected = sequence_sums(batch["ref_logps"], batch, max_pairs)
  return _with_lengths(chosen, rejected, batch, max_pairs)


def _with_lengths(chosen, rejected, batch, max_pairs) -> PairLogps:
  c_len, r_len = sequence_sums(batch["loss_mask"].astype(jnp.float32), batch, max_pairs)
  return PairLogps(chosen, rejected, c_len, r_len, pair_valid(batch, max_pairs))
