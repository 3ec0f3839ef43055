"""Activation-times-weight matmuls with a hand-written backward pass.

The math is autodiff's; only the operand order of the weight gradient differs. JAX
transposes `y = x @ w` into `dw = dot(x, dy)`, contracting the token axis that leads both
operands, and XLA:CPU then materializes the second operand transposed. That operand is `dy`,
usually a fusion (SwiGLU's or the softmax's backward), which XLA recomputes in transposed,
cache-hostile order: on a 2-core CPU the MLP's forward+backward took 62 ms where the same
matmuls take 37 ms once the gradient is written `dot(dy, x)^T`, whose transposed operand is
the plain activation `x` (bench/RESULTS.md). GPUs and TPUs run either order at the same
speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The name remat policies use to keep these outputs (a custom-VJP matmul is not a
# `dot_general` to `jax.checkpoint_policies.checkpoint_dots`).
CHECKPOINT_NAME = "weight_matmul"


def _split_spec(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  x_spec, w_spec = inputs.split(",")
  return x_spec, w_spec, out


def weight_matmul(x: jax.Array, w: jax.Array, spec: str, out_dtype=None) -> jax.Array:
  """`einsum(spec, x, w)` with float32 accumulation, returned in `out_dtype` (x's if None).

  Args:
    x: activations, e.g. `[batch, seq, d_model]`; `w`: a weight, e.g. `[d_model, d_ff]`, in
      x's dtype. `spec` names x's axes, then w's, then the output's (`"bsd,df->bsf"`).
  """
  return checkpoint_name(_matmul(x, w, spec, jnp.dtype(out_dtype or x.dtype)), CHECKPOINT_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, spec, out_dtype):
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _forward(x, w, spec, out_dtype):
  return _matmul(x, w, spec, out_dtype), (x, w)


def _backward(spec, out_dtype, residuals, dy):
  x, w = residuals
  x_spec, w_spec, out_spec = _split_spec(spec)
  dy = dy.astype(x.dtype)
  dx = jnp.einsum(f"{out_spec},{w_spec}->{x_spec}", dy, w, preferred_element_type=jnp.float32)
  # XLA:CPU materializes the second operand transposed: make that the smaller one.
  if x.size <= dy.size:
    dw = jnp.einsum(f"{out_spec},{x_spec}->{w_spec}", dy, x, preferred_element_type=jnp.float32)
  else:
    dw = jnp.einsum(f"{x_spec},{out_spec}->{w_spec}", x, dy, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_forward, _backward)
