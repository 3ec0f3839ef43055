"""Attention over packed rows: causal within a document, never across documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large negative instead of -inf keeps fully masked rows (none exist with the diagonal
# always visible, but padding rows come close) free of NaN in softmax and its gradient.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array:
  """Boolean mask `[batch or 1, 1, 1, q_len, k_len]`: causal and same-segment.

  Packed rows hold several documents back to back; tokens of one document must never see
  another's. Padding (segment 0) attends only to padding, which keeps its rows finite.
  """
  causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
  if segment_ids is None:
    return causal[None, None, None]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          segment_ids: jax.Array | None = None) -> jax.Array:
  """Reference XLA grouped-query attention.

  Args:
    q: `[batch, seq, n_heads, head_dim]`.
    k, v: `[batch, seq, n_kv_heads, head_dim]`; n_heads is a multiple of n_kv_heads.
    segment_ids: `[batch, seq]` document ids of a packed row (0 = padding), or None.
  Returns:
    `[batch, seq, n_heads, head_dim]` in q's dtype.
  """
  b, s, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, s, kv, n // kv, h)
  scores = jnp.einsum("bskgh,btkh->bkgst", q, k, preferred_element_type=jnp.float32)
  scores = scores * (h ** -0.5)
  scores = jnp.where(attention_mask(segment_ids, s), scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkh->bskgh", probs, v)
  return out.reshape(b, s, n, h)
