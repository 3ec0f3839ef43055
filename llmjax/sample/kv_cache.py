"""The key/value cache of batched generation.

One buffer per layer, `[batch, cache_len, n_kv_heads, head_dim]`, plus which slots hold real
tokens and where each row writes next. Rows write at their own slot (`index [batch]`), so
left-padded rows (all at the same slot) and right-padded rows (each after its own prompt)
share one code path; padding slots stay invalid and are never attended to.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax.model.config import ModelConfig


class KVCache(NamedTuple):
  """A pytree; `Transformer.decode` returns an updated copy.

  k, v: per layer `[batch, cache_len, n_kv_heads, head_dim]` in the compute dtype.
  valid: `[batch, cache_len]` bool, True where a slot holds a real (non-padding) token.
  index: `[batch]` int32, the slot the next token of each row is written to.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype=None) -> KVCache:
  """An empty cache (call inside jit, so the zeros are created on the device)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cache_len, cfg.n_kv_heads, cfg.resolved_head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=zeros(), v=zeros(), valid=jnp.zeros((batch, cache_len), jnp.bool_),
                 index=jnp.zeros((batch,), jnp.int32))


def repeat_rows(cache: KVCache, times: int) -> KVCache:
  """Each row `times` times in a row (one prefill serves every sample of a prompt)."""
  if times == 1:
    return cache
  return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), cache)


def grow(cache: KVCache, cache_len: int) -> KVCache:
  """The cache with `cache_len - current` empty (invalid) slots appended.

  The sampler decodes in segments whose cache ends just past the last slot they can write,
  so a step's attention reads only the filled part (plus a bounded margin), not the budget.
  """
  extra = cache_len - cache.valid.shape[1]
  if extra <= 0:
    return cache
  pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
  return cache._replace(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                        valid=pad(cache.valid))


def cache_bytes(cfg: ModelConfig, batch: int, cache_len: int, dtype=None) -> int:
  """Bytes of the k and v buffers: what each decode step reads besides the weights."""
  itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
  return 2 * cfg.n_layers * batch * cache_len * cfg.n_kv_heads * cfg.resolved_head_dim * itemsize
