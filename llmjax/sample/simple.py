"""A quick-look sampler: greedy or temperature sampling by full recomputation.

Each new token re-runs the model over a fixed-length buffer, so one compiled function serves
every step and every prompt of a length bucket. Quadratic in length, fine for a look at a
small model; the batched KV-cache sampler is the engine for real generation workloads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

_BUCKET = 64


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(graphdef, params, buffer, length, temperature, key):
  """Samples the token after `buffer[:, :length]`. buffer: `[1, bucket]` int32."""
  logits = nnx.merge(graphdef, params)(buffer)[0, length - 1]
  greedy = jnp.argmax(logits)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(graphdef: nnx.GraphDef, params: nnx.State, prompt_ids: list[int],
             max_new_tokens: int, *, temperature: float = 0.0, eos_id: int | None = None,
             seed: int = 0) -> list[int]:
  """Continues `prompt_ids` by up to `max_new_tokens`; returns the new tokens only."""
  total = len(prompt_ids) + max_new_tokens
  bucket = -(-total // _BUCKET) * _BUCKET
  buffer = jnp.zeros((1, bucket), jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids))
  key = jax.random.key(seed)
  out = []
  for length in range(len(prompt_ids), total):
    key, sub = jax.random.split(key)
    token = _next_token(graphdef, params, buffer, length, jnp.float32(temperature), sub)
    token_id = int(token)
    if eos_id is not None and token_id == eos_id:
      break
    out.append(token_id)
    buffer = buffer.at[0, length].set(token)
  return out
