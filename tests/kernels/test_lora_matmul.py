"""Fused LoRA Pallas kernel vs the jnp reference (CPU interpret mode).

Tolerances, argued from dtype:
* fp32: kernel and reference add the same exact-ish fp32 products in a
  different order; reordering error is ~ sqrt(K) * 2^-24 relative to the
  output scale, so 1e-5 of max|y| leaves > 10x headroom for K <= 96.
* bf16: both sides see the same bf16 inputs and accumulate in fp32, so the
  only real difference is the final round to bf16, where a near-tie can
  flip by one ulp: 2^-7 relative (8 significand bits) of max|y|.
* bf16 vs an fp32 reference on the unrounded inputs: each product carries
  ~2^-8 relative input rounding and K of them add like a random walk, so
  the error is ~ 2^-8 * sqrt(K) * rms(x) * rms(w) per output (we allow 4x).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels import lora_matmul, lora_matmul_reference

_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}
# Small explicit tiles force multi-tile grids and padding in every dim.
_SMALL = dict(block_m=8, block_n=32, block_k=32)


def _inputs(seed, m, k, n, r, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], (m, k), jnp.float32)
  w = jax.random.normal(ks[1], (k, n), jnp.float32) / np.sqrt(k)
  a = jax.random.normal(ks[2], (k, r), jnp.float32) / np.sqrt(k)
  b = jax.random.normal(ks[3], (r, n), jnp.float32)
  return [t.astype(dtype) for t in (x, w, a, b)]


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  atol = rtol * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,r", [(1, 64, 32, 4), (7, 96, 80, 8),
                                     (64, 64, 80, 4)])
def test_forward_matches_reference(m, k, n, r, dtype):
  x, w, a, b = _inputs(m * 1000 + k + n, m, k, n, r, dtype)
  got = lora_matmul(x, w, a, b, 0.5, **_SMALL)
  assert got.dtype == dtype
  _assert_close(got, lora_matmul_reference(x, w, a, b, 0.5), _RTOL[dtype])


def test_default_blocks_batched_leading_dims():
  x, w, a, b = _inputs(3, 6, 96, 80, 8, jnp.float32)
  x3 = x.reshape(2, 3, 96)
  got = jax.jit(lambda *t: lora_matmul(*t, 2.0))(x3, w, a, b)
  assert got.shape == (2, 3, 80)
  _assert_close(got, lora_matmul_reference(x3, w, a, b, 2.0), 1e-5)


def test_bf16_kernel_vs_fp32_math():
  m, k, n, r = 7, 96, 80, 8
  x, w, a, b = _inputs(4, m, k, n, r, jnp.float32)
  got = lora_matmul(*(t.astype(jnp.bfloat16) for t in (x, w, a, b)), 1.0,
                    **_SMALL).astype(jnp.float32)
  want = lora_matmul_reference(x, w, a, b, 1.0)
  rms_x = float(jnp.sqrt(jnp.mean(x**2)))
  rms_w = float(jnp.sqrt(jnp.mean(w**2)))
  bound = 4 * 2.0**-8 * np.sqrt(k) * rms_x * rms_w * 2  # 2: base + LoRA path
  bound += 2.0**-8 * float(jnp.abs(want).max())  # final bf16 rounding
  assert float(jnp.abs(got - want).max()) <= bound


@pytest.mark.parametrize("dtype,m,k,n,r", [(jnp.float32, 7, 96, 80, 8),
                                           (jnp.float32, 1, 64, 32, 4),
                                           (jnp.bfloat16, 64, 64, 80, 4)])
def test_gradients_match_reference(dtype, m, k, n, r):
  x, w, a, b = _inputs(m + k + n + r, m, k, n, r, dtype)
  cot = jax.random.normal(jax.random.PRNGKey(9), (m, n), dtype)

  def loss(fn):
    return lambda x, a, b: jnp.sum(
        fn(x, w, a, b).astype(jnp.float32) * cot.astype(jnp.float32))

  kern = lambda x, w, a, b: lora_matmul(x, w, a, b, 0.75, **_SMALL)
  ref = lambda x, w, a, b: lora_matmul_reference(x, w, a, b, 0.75)
  got = jax.jit(jax.grad(loss(kern), argnums=(0, 1, 2)))(x, a, b)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, a, b)
  # bf16 gradients are rounded to bf16 once more on each side; the
  # per-element ulp argument of the forward applies to each of dx, dA, dB.
  for g, wnt in zip(got, want):
    assert g.dtype == wnt.dtype
    _assert_close(g, wnt, 4 * _RTOL[dtype])


def test_frozen_weight_gets_zero_gradient():
  x, w, a, b = _inputs(5, 7, 64, 32, 4, jnp.float32)
  for impl in ("pallas", "reference"):
    gw = jax.grad(lambda w: jnp.sum(lora_matmul(x, w, a, b, 1.0, impl=impl,
                                                **_SMALL)))(w)
    assert float(jnp.abs(gw).max()) == 0.0


def test_reference_impl_and_shape_errors():
  x, w, a, b = _inputs(6, 7, 64, 32, 4, jnp.float32)
  _assert_close(lora_matmul(x, w, a, b, 1.0, impl="reference"),
                lora_matmul_reference(x, w, a, b, 1.0), 0.0)
  with pytest.raises(ValueError, match="b must be"):
    lora_matmul(x, w, a, b.T, 1.0)
  with pytest.raises(ValueError, match="w must be"):
    lora_matmul(x, w.T, a, b, 1.0)
  with pytest.raises(ValueError, match="impl"):
    lora_matmul(x, w, a, b, 1.0, impl="triton")
