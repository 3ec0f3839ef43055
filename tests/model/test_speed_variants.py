"""Every speed switch computes the same function: remat, scan, attention backends, lean loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.model.config import PRESETS
from llmjax.model.transformer import build_model
from llmjax.train.losses import lm_loss

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=128, d_model=64, d_ff=96, max_seq_len=128)


def packed_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (2, 128)).astype(np.int32)
  seg = np.concatenate([np.ones((2, 60)), 2 * np.ones((2, 58)), np.zeros((2, 10))], 1)
  pos = np.concatenate([np.arange(60), np.arange(58), np.zeros(10)])[None].repeat(2, 0)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones_like(tokens),
          "segment_ids": seg.astype(np.int32), "positions": pos.astype(np.int32)}


def loss_and_grads(cfg, chunk_size=0):
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  batch = packed_batch()
  fn = lambda p: lm_loss(nnx.merge(graphdef, p), batch, chunk_size)[0]
  return jax.jit(jax.value_and_grad(fn))(params)


@pytest.fixture(scope="module")
def reference():
  return loss_and_grads(CFG)


@pytest.mark.parametrize("variant", [
    {"remat": "full"}, {"remat": "dots"}, {"scan_layers": True},
    {"scan_layers": True, "remat": "dots_no_batch"},
    {"attention": "dot_product"}, {"attention": "splash"},
    {"chunk_size": 48}])  # 128 positions: chunks of 48, 48 and a padded 32
def test_variant_matches_plain_model(reference, variant):
  variant = dict(variant)
  chunk = variant.pop("chunk_size", 0)
  loss, grads = loss_and_grads(dataclasses.replace(CFG, **variant), chunk)
  ref_loss, ref_grads = reference
  # remat/scan/chunking reorder no arithmetic; fused attention kernels reorder the softmax sums.
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_speed_switches_do_not_change_the_checkpoint_shape():
  fast = dataclasses.replace(CFG, remat="dots", scan_layers=True, attention="dot_product")
  assert fast.shape_dict() == CFG.shape_dict()
  a = jax.tree.map(jnp.shape, nnx.state(build_model(CFG), nnx.Param))
  b = jax.tree.map(jnp.shape, nnx.state(build_model(fast), nnx.Param))
  assert a == b
