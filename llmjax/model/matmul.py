"""Activation-times-weight matmuls with a hand-written backward pass.

The math is autodiff's; only how the weight gradient `dw = x^T dy` reaches the matmul
differs. Autodiff emits one `dot_general` contracting the token axis that leads both `x` and
`dy`, and XLA:CPU then picks a layout for it: it recomputed SwiGLU's backward in transposed,
cache-hostile order, and ran the `[d_model, vocab]` gradient at half the speed of a plain
matmul (bench/RESULTS.md has the numbers). Here every projection is viewed as a 2-D
`[tokens, d_in] @ [d_in, d_out]`, and the forward pass keeps `x^T` instead of `x`, written
out once while `x` is still in cache (an optimization barrier keeps XLA:CPU from folding it
back), so that `dw` is a plain row-major matmul. Other backends
get the same 2-D form without the barrier: cuBLAS and the TPU compiler take transposed
operands natively.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The name remat policies use to keep these outputs (a custom-VJP matmul is not a
# `dot_general` to `jax.checkpoint_policies.checkpoint_dots`).
CHECKPOINT_NAME = "weight_matmul"


def weight_matmul(x: jax.Array, w: jax.Array, spec: str, out_dtype=None) -> jax.Array:
  """`einsum(spec, x, w)` returned in `out_dtype` (x's if None), accumulated in float32 where
  the device's matmul does (GPU/TPU bf16 matmuls accumulate in float32).

  Args:
    x: activations `[*tokens, *d_in]`, e.g. `[batch, seq, d_model]`.
    w: a weight `[*d_in, *d_out]` in x's dtype, e.g. `[d_model, n_heads, head_dim]`.
    spec: the einsum; it must contract x's trailing axes with w's leading ones and keep the
      rest in order, as every projection does: `"bsd,df->bsf"`, `"bsnh,nhd->bsd"`.
  Returns:
    `[*tokens, *d_out]`.
  """
  n_in = contracted_axes(spec)
  return checkpoint_name(_matmul(x, w, n_in, jnp.dtype(out_dtype or x.dtype)), CHECKPOINT_NAME)


def contracted_axes(spec: str) -> int:
  """How many trailing axes of x meet leading axes of w; a ValueError for other einsums."""
  inputs, out = spec.replace(" ", "").split("->")
  x_spec, w_spec = inputs.split(",")
  n_in = (len(x_spec) + len(w_spec) - len(out)) // 2
  tokens, d_in = x_spec[:len(x_spec) - n_in], x_spec[len(x_spec) - n_in:]
  if n_in == 0 or w_spec[:n_in] != d_in or out != tokens + w_spec[n_in:]:
    raise ValueError(f"weight_matmul needs an einsum 'tokens+in,in+out->tokens+out', got {spec!r}")
  return n_in


def _flat(x, w, n_in):
  """`x [tokens, d_in]`, `w [d_in, d_out]` and the output's full shape."""
  tokens, d_out = x.shape[:x.ndim - n_in], w.shape[n_in:]
  d_in = math.prod(w.shape[:n_in])
  return x.reshape(-1, d_in), w.reshape(d_in, -1), tokens + d_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, n_in, out_dtype):
  x2, w2, out_shape = _flat(x, w, n_in)
  return jnp.dot(x2, w2, preferred_element_type=out_dtype).reshape(out_shape)


def _forward(x, w, n_in, out_dtype):
  # The backward needs x only as x^T (for dw): transposed here, while x is still in cache,
  # and kept instead of x.
  x2, _, _ = _flat(x, w, n_in)
  x2_t = x2.T
  if jax.default_backend() == "cpu":
    x2_t = jax.lax.optimization_barrier(x2_t)
  return _matmul(x, w, n_in, out_dtype), (x2_t, w)


def _backward(n_in, out_dtype, residuals, dy):
  x2_t, w = residuals
  w2 = w.reshape(x2_t.shape[0], -1)
  dy2 = dy.astype(x2_t.dtype).reshape(x2_t.shape[1], w2.shape[1])
  dx = jnp.dot(dy2, w2.T, preferred_element_type=x2_t.dtype)
  dw = jnp.dot(x2_t, dy2, preferred_element_type=w.dtype)
  x_shape = dy.shape[:dy.ndim - (w.ndim - n_in)] + w.shape[:n_in]
  return dx.reshape(x_shape), dw.reshape(w.shape)


_matmul.defvjp(_forward, _backward)
