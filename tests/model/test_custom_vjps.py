"""Hand-written backward passes (attention, weight matmuls, SwiGLU) equal plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.model import attention
from llmjax.model.causal_attention import MAX_BLOCKS, block_bounds, causal_attention
from llmjax.model.matmul import weight_matmul
from llmjax.model.transformer import REMAT_POLICIES, swiglu


def qkv(batch, seq, heads, kv_heads, head_dim=8, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
  return q, k, v


def packed_segments(batch, seq):
  """Three documents of different lengths per row, then padding (segment 0)."""
  rng = np.random.default_rng(1)
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq - 4), 3, replace=False))
    row = np.zeros(seq, np.int32)
    for i, (a, b) in enumerate(zip([0, *cuts[:2]], cuts)):
      row[a:b] = i + 1
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def value_and_grads(fn, q, k, v):
  # A loss that weights every output element differently, so no gradient term can cancel.
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("heads,kv_heads,block_size", [
    (4, 2, 0), (4, 2, 16), (4, 2, 24),  # one block, four, a size that does not divide (one)
    (4, 4, 32), (4, 1, 16)])
def test_blocked_attention_equals_reference_forward_and_gradients(heads, kv_heads, block_size):
  q, k, v = qkv(2, 64, heads, kv_heads)
  seg = packed_segments(2, 64)
  ref = lambda q, k, v: attention.dot_product_attention(q, k, v, seg)
  got = lambda q, k, v: causal_attention(q, k, v, seg, block_size)
  np.testing.assert_allclose(jax.jit(got)(q, k, v), jax.jit(ref)(q, k, v), atol=2e-6)
  (loss, grads), (ref_loss, ref_grads) = value_and_grads(got, q, k, v), value_and_grads(ref, q, k, v)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_unpacked_rows_are_plain_causal_attention():
  q, k, v = qkv(2, 32, 4, 2, seed=3)
  got = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 8))(q, k, v)
  np.testing.assert_allclose(got, jax.jit(attention.dot_product_attention)(q, k, v), atol=2e-6)


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
  q, k, v = qkv(1, 32, 4, 2, dtype=jnp.bfloat16)
  seg = packed_segments(1, 32)
  out = jax.jit(lambda q, k, v: causal_attention(q, k, v, seg, 8))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(attention.dot_product_attention)(f32(q), f32(k), f32(v), seg)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
  _, grads = value_and_grads(lambda q, k, v: causal_attention(q, k, v, seg, 8), q, k, v)
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
             for g in grads)


def test_block_bounds():
  assert block_bounds(256, 64) == [(0, 64), (64, 128), (128, 192), (192, 256)]
  assert block_bounds(100, 64) == [(0, 100)]  # does not divide: one block
  assert block_bounds(32, 64) == [(0, 32)]
  long = block_bounds(64 * 4 * MAX_BLOCKS, 64)  # grows the block instead of unrolling more
  assert len(long) == MAX_BLOCKS and long[0] == (0, 256)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("bsd,df->bsf", (2, 6, 8), (8, 16)),       # x smaller than dy
    ("bsf,fd->bsd", (2, 6, 16), (16, 8)),      # x larger than dy
    ("bsd,dnh->bsnh", (2, 6, 8), (8, 2, 4)),
    ("bsnh,nhd->bsd", (2, 6, 2, 4), (2, 4, 8)),
])
def test_weight_matmul_gradients_equal_autodiff(spec, x_shape, w_shape):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  out_shape = jnp.einsum(spec, x, w).shape
  c = jax.random.normal(kc, out_shape)  # a cotangent with no structure
  ours = jax.grad(lambda x, w: jnp.sum(weight_matmul(x, w, spec) * c), argnums=(0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * c), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_weight_matmul_refuses_an_einsum_it_cannot_flatten():
  with pytest.raises(ValueError, match="tokens\+in,in\+out"):
    weight_matmul(jnp.ones((2, 3, 4)), jnp.ones((3, 5)), "bsd,sf->bdf")


def test_weight_matmul_keeps_dtypes():
  x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)
  assert weight_matmul(x, w, "nd,dv->nv", jnp.float32).dtype == jnp.float32
  dx, dw = jax.grad(lambda x, w: weight_matmul(x, w, "nd,dv->nv", jnp.float32).sum(),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch"])
def test_remat_policies_keep_weight_matmul_outputs(policy, capsys):
  """The custom VJP hides the matmul from `checkpoint_dots`; the name keeps it saveable."""
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 8))
  fn = lambda x: jnp.sum(weight_matmul(jnp.tanh(weight_matmul(x, w1, "nd,df->nf")), w2,
                                       "nf,fd->nd"))
  jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(fn, policy=REMAT_POLICIES[policy]), jnp.ones((4, 8)))
  assert "f32[4,16]" in capsys.readouterr().out  # the first matmul's output, not recomputed
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(fn), jnp.ones((4, 8)))
  assert "f32[4,16]" not in capsys.readouterr().out


def test_swiglu_gradients_equal_autodiff():
  kg, ku, kc = jax.random.split(jax.random.key(2), 3)
  gate, up = 3 * jax.random.normal(kg, (4, 8)), jax.random.normal(ku, (4, 8))
  c = jax.random.normal(kc, (4, 8))
  ours = jax.grad(lambda g, u: jnp.sum(swiglu(g, u) * c), argnums=(0, 1))(gate, up)
  ref = jax.grad(lambda g, u: jnp.sum(jax.nn.silu(g) * u * c), argnums=(0, 1))(gate, up)
  np.testing.assert_allclose(swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
