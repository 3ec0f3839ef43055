"""Causal, document-separated attention in plain XLA ops, blocked along the queries.

The training path of the `xla` attention backend. Two things make it faster than
differentiating `softmax(q k^T) v` directly, on any device XLA compiles for:

- Queries go in blocks and block `i` only meets the keys up to its own end, so the upper
  triangle a causal mask throws away is mostly never computed (3/8 of the work at 4 blocks).
- A hand-written backward pass in the flash-attention form: the forward keeps only the
  output and each row's log-sum-exp, the backward recomputes the probabilities and uses
  `ds = p * (dp - rowsum(do * o))`. Autodiff of the softmax instead stores the
  `[batch, heads, seq, seq]` probabilities and makes several passes over them.

The math equals `attention.dot_product_attention` (tests/model/test_custom_vjps.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A large negative instead of -inf keeps fully masked rows (none exist with the diagonal
# always visible, but padding rows come close) free of NaN in softmax and its gradient.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# Blocks are unrolled at trace time; past this many, they grow instead (compile time).
MAX_BLOCKS = 16


def block_bounds(seq_len: int, block_size: int) -> list[tuple[int, int]]:
  """Query blocks `[(start, end), ...]`: `block_size` rows each, doubled until there are at
  most `MAX_BLOCKS`; one block when the size does not divide `seq_len`."""
  while block_size > 0 and seq_len // block_size > MAX_BLOCKS:
    block_size *= 2
  if block_size <= 0 or seq_len <= block_size or seq_len % block_size:
    return [(0, seq_len)]
  return [(i, i + block_size) for i in range(0, seq_len, block_size)]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     block_size: int = 64) -> jax.Array:
  """Grouped-query attention, causal within each packed document.

  Args:
    q: `[batch, seq, n_heads, head_dim]`.
    k, v: `[batch, seq, n_kv_heads, head_dim]`; n_heads is a multiple of n_kv_heads.
    segment_ids: `[batch, seq]` document ids (0 = padding, which sees only padding), or None.
    block_size: query rows per block.
  Returns:
    `[batch, seq, n_heads, head_dim]` in q's dtype.
  """
  b, s, n, h = q.shape
  kv = k.shape[2]
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  # Grouped layout: query heads sharing a K/V head sit next to it, batch-major, so every
  # product is a plain batched matmul.
  qg = q.reshape(b, s, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [b, kv, g, s, h]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, h]
  out = _attention(qg, kt, vt, segment_ids, block_bounds(s, block_size))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def _scores(q, k, segment_ids, lo, hi):
  """Masked, scaled scores of query rows `lo:hi` against keys `:hi`: `[b, kv, g, hi-lo, hi]`."""
  b, kv, g, _, h = q.shape
  qi = q[:, :, :, lo:hi].reshape(b, kv, g * (hi - lo), h) * (h ** -0.5)
  scores = jnp.einsum("bkqh,bkth->bkqt", qi, k[:, :, :hi], preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, hi - lo, hi)
  rows = jnp.arange(lo, hi)[:, None]
  causal = rows >= jnp.arange(hi)[None, :]
  same_doc = segment_ids[:, lo:hi, None] == segment_ids[:, None, :hi]
  mask = (causal[None] & same_doc)[:, None, None]  # [b, 1, 1, q, t]
  return jnp.where(mask, scores, MASK_VALUE)


def _pv(p, v):
  """`p [b, kv, g, q, t] @ v[:, :, :t]` -> `[b, kv, g, q, h]`."""
  b, kv, g, rows, t = p.shape
  out = jnp.einsum("bkqt,bkth->bkqh", p.reshape(b, kv, g * rows, t), v[:, :, :t],
                   preferred_element_type=jnp.float32)
  return out.reshape(b, kv, g, rows, v.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, bounds):
  return _forward(q, k, v, segment_ids, bounds)[0]


def _forward(q, k, v, segment_ids, bounds):
  outs, lses = [], []
  for lo, hi in bounds:
    scores = _scores(q, k, segment_ids, lo, hi)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    outs.append((_pv(p.astype(v.dtype), v) / total).astype(q.dtype))
    lses.append(m[..., 0] + jnp.log(total[..., 0]))
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, segment_ids, out, jnp.concatenate(lses, axis=3))


def _backward(bounds, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  b, kv, g, _, h = q.shape
  scale = h ** -0.5
  # rowsum(do * o) = sum_t p_t dp_t: the softmax backward's correction term, per query row.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for lo, hi in bounds:
    rows = hi - lo
    p = jnp.exp(_scores(q, k, segment_ids, lo, hi) - lse[:, :, :, lo:hi, None])
    p_flat = p.reshape(b, kv, g * rows, hi)
    do = d_out[:, :, :, lo:hi].reshape(b, kv, g * rows, h)
    dv = dv.at[:, :, :hi].add(jnp.einsum("bkqt,bkqh->bkth", p_flat.astype(v.dtype), do,
                                         preferred_element_type=jnp.float32))
    dp = jnp.einsum("bkqh,bkth->bkqt", do, v[:, :, :hi], preferred_element_type=jnp.float32)
    ds = p_flat * (dp - delta[:, :, :, lo:hi].reshape(b, kv, g * rows, 1))
    ds = ds.astype(q.dtype)
    dq_blocks.append(jnp.einsum("bkqt,bkth->bkqh", ds, k[:, :, :hi],
                                preferred_element_type=jnp.float32).reshape(b, kv, g, rows, h))
    qi = q[:, :, :, lo:hi].reshape(b, kv, g * rows, h)
    dk = dk.at[:, :, :hi].add(jnp.einsum("bkqt,bkqh->bkth", ds, qi,
                                         preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_blocks, axis=3) * scale
  return (dq.astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), None)


_attention.defvjp(_forward, _backward)
