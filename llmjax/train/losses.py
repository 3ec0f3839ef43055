"""Pure loss functions. Each returns sums, not means, so microbatches and hosts add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
  """`[batch, seq]` float32: 1 where a target is trained on (inside a document, loss-masked)."""
  return (batch["loss_mask"] * (batch["segment_ids"] != 0)).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross-entropy.

  Args:
    logits: `[batch, seq, vocab]`, any float dtype (computed in float32).
    targets: `[batch, seq]` int token ids.
    weights: `[batch, seq]` float, 0 where a position does not count.
  Returns:
    (sum of weighted token losses, sum of weights), both float32 scalars.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def lm_loss(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Next-token loss of `model` on a packed batch: (loss sum, target count)."""
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  return token_cross_entropy(logits, batch["targets"], target_weights(batch))
