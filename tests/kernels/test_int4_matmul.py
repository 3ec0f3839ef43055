"""int4 / NF4 weight-only quantization and the Pallas matmul (interpret).

Kernel-vs-reference tolerances: both sides dequantize to the *same* weights
(rounded to x.dtype) and accumulate exact products in fp32, so they differ
only by summation order (fp32: ~ sqrt(K) * 2^-24 relative -> 1e-5 of max|y|
is ample) and, for bf16, by a possible one-ulp flip of the final rounding
(2^-7 relative to max|y|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels import (NF4_CODE, Int4Weight, dequantize_int4,
                            int4_matmul, int4_matmul_reference, pack_int4,
                            quantize_int4, unpack_int4)

_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  atol = rtol * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_pack_unpack_round_trip_all_codes(group_size):
  d_in, d_out = 2 * group_size, 24
  # Every code appears in every position parity (low and high nibble).
  codes = (np.arange(d_in * d_out) * 7 % 16).reshape(d_in, d_out)
  codes = jnp.asarray(codes, jnp.uint8)
  packed = pack_int4(codes, group_size)
  assert packed.shape == (d_in // 2, d_out) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(unpack_int4(packed, group_size), codes)
  assert set(np.unique(np.asarray(codes)).tolist()) == set(range(16))


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_absmax_error_bound(group_size, scale_dtype):
  w = jax.random.normal(jax.random.PRNGKey(group_size), (256, 48)) * 3
  w = w.at[:group_size, 0].set(0.0)  # an all-zero group must stay exact
  q = quantize_int4(w, group_size, "int4", scale_dtype)
  assert q.scales.shape == (256 // group_size, 48)
  assert q.scales.dtype == scale_dtype
  err = jnp.abs(dequantize_int4(q) - w).reshape(-1, group_size, 48)
  s = q.scales.astype(jnp.float32)[:, None, :]
  # Round-to-nearest on a grid of spacing s: |err| <= s/2 (+ fp32 slack).
  assert bool(jnp.all(err <= s / 2 * (1 + 1e-6) + 1e-7))
  assert float(err[0, :, 0].max()) == 0.0


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_nf4_error_bound(group_size):
  w = jax.random.normal(jax.random.PRNGKey(7 + group_size), (256, 40))
  q = quantize_int4(w, group_size, "nf4")
  err = jnp.abs(dequantize_int4(q) - w).reshape(-1, group_size, 40)
  absmax = jnp.abs(w).reshape(-1, group_size, 40).max(axis=1, keepdims=True)
  half_gap = float(np.diff(NF4_CODE).max()) / 2
  assert bool(jnp.all(err <= half_gap * absmax * (1 + 1e-6)))
  # Code points themselves (times the scale) are reproduced exactly.
  grid = jnp.asarray(np.tile(NF4_CODE, 8)[:, None] * np.ones((1, 4)))
  qg = quantize_int4(grid.astype(jnp.float32), 32, "nf4")
  np.testing.assert_allclose(dequantize_int4(qg), grid, atol=1e-7)


def test_int4weight_is_pytree_and_validates():
  q = quantize_int4(jnp.ones((64, 16)), 32)
  leaves, tree = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 2
  q2 = jax.tree_util.tree_unflatten(tree, leaves)
  assert isinstance(q2, Int4Weight) and q2.shape == (64, 16)
  with pytest.raises(ValueError, match="divisible by group_size"):
    quantize_int4(jnp.ones((96, 16)), 64)
  with pytest.raises(ValueError, match="group_size must be one of"):
    quantize_int4(jnp.ones((96, 16)), 48)
  with pytest.raises(ValueError, match="scheme"):
    quantize_int4(jnp.ones((64, 16)), 32, "fp4")


# (m, k, n, group_size, scheme, dtype): decode (m=1), ragged m/n, K with an
# odd number of groups (96/32) and one group per K (128/128).
_CASES = [
    (1, 64, 32, 32, "int4", jnp.float32),
    (1, 128, 80, 128, "nf4", jnp.bfloat16),
    (7, 96, 80, 32, "int4", jnp.bfloat16),
    (7, 96, 32, 32, "nf4", jnp.float32),
    (64, 128, 80, 64, "int4", jnp.float32),
    (64, 64, 80, 64, "nf4", jnp.bfloat16),
]


@pytest.mark.parametrize("m,k,n,gs,scheme,dtype", _CASES)
def test_matmul_matches_reference(m, k, n, gs, scheme, dtype):
  ks = jax.random.split(jax.random.PRNGKey(m + k + n + gs), 2)
  q = quantize_int4(jax.random.normal(ks[0], (k, n)) / np.sqrt(k), gs,
                    scheme)
  x = jax.random.normal(ks[1], (m, k)).astype(dtype)
  got = int4_matmul(x, q, block_m=8, block_n=32, block_k=64)
  assert got.dtype == dtype
  _assert_close(got, int4_matmul_reference(x, q), _RTOL[dtype])


def test_default_blocks_jit_leading_dims():
  q = quantize_int4(jax.random.normal(jax.random.PRNGKey(1), (128, 48)), 64)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 128))
  got = jax.jit(int4_matmul)(x, q)
  assert got.shape == (2, 3, 48)
  _assert_close(got, int4_matmul_reference(x, q), 1e-5)
  # The reference is exactly x @ dequant(W).
  _assert_close(int4_matmul_reference(x, q), x @ dequantize_int4(q), 1e-5)


@pytest.mark.parametrize("m,k,n,gs,scheme,dtype", [
    (7, 96, 80, 32, "int4", jnp.float32),
    (1, 128, 32, 64, "nf4", jnp.float32),
    (64, 128, 80, 128, "int4", jnp.bfloat16),
])
def test_grad_x_matches_reference(m, k, n, gs, scheme, dtype):
  ks = jax.random.split(jax.random.PRNGKey(k * n + gs), 3)
  q = quantize_int4(jax.random.normal(ks[0], (k, n)) / np.sqrt(k), gs,
                    scheme)
  x = jax.random.normal(ks[1], (m, k)).astype(dtype)
  cot = jax.random.normal(ks[2], (m, n)).astype(jnp.float32)

  def loss(fn):
    return lambda x, q: jnp.sum(fn(x, q).astype(jnp.float32) * cot)

  kern = lambda x, q: int4_matmul(x, q, block_m=8, block_n=32, block_k=64)
  got = jax.jit(jax.grad(loss(kern)))(x, q)
  wd = dequantize_int4(q)
  want = jax.grad(lambda x: jnp.sum(
      (x @ wd.astype(dtype)).astype(jnp.float32) * cot))(x)
  assert got.dtype == dtype
  _assert_close(got, want, 4 * _RTOL[dtype])


def test_matmul_rejects_bad_shapes():
  q = quantize_int4(jnp.ones((64, 16)), 32)
  with pytest.raises(ValueError, match="d_in"):
    int4_matmul(jnp.ones((3, 32)), q)
  with pytest.raises(ValueError, match="impl"):
    int4_matmul(jnp.ones((3, 64)), q, impl="xla")
