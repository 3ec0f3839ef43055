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


def lm_loss(model, batch: dict[str, jax.Array],
            chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token loss of `model` on a packed batch: (loss sum, target count).

  With `chunk_size > 0` the output projection and softmax run over `chunk_size` positions
  at a time and are recomputed in the backward pass, so the `[batch, seq, vocab]` float32
  logits never exist at once: the memory-lean path for 128k-256k vocabularies.
  """
  weights = target_weights(batch)
  if not chunk_size:
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return token_cross_entropy(logits, batch["targets"], weights)
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  b, s, d = hidden.shape
  if s % chunk_size:
    raise ValueError(f"seq_len {s} is not a multiple of the loss chunk size {chunk_size}")
  split = lambda x: x.reshape((b, s // chunk_size, chunk_size) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(h, t, w):
    return token_cross_entropy(model.logits(h), t, w)

  def body(carry, xs):
    loss_sum, count = chunk_loss(*xs)
    return (carry[0] + loss_sum, carry[1] + count), None
  zero = jnp.zeros((), jnp.float32)
  (loss_sum, count), _ = jax.lax.scan(body, (zero, zero),
                                      (split(hidden), split(batch["targets"]), split(weights)))
  return loss_sum, count
