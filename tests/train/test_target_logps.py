"""`target_logps` over a completion window equals the full-sequence computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.model.config import PRESETS
from llmjax.model.transformer import build_model
from llmjax.train.losses import target_logps

CFG = dataclasses.replace(PRESETS["tiny"], d_model=32, n_heads=2, n_kv_heads=1, d_ff=64,
                          vocab_size=64)


def _batch(rng, rows=3, seq=12):
  """Rows of a prompt then a completion of at most 4 targets; the last row has none."""
  tokens = rng.integers(1, CFG.vocab_size, (rows, seq)).astype(np.int32)
  loss_mask = np.zeros((rows, seq), np.int32)
  loss_mask[0, 2:6] = 1
  loss_mask[1, 9:12] = 1  # the window runs past the row's end
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(seq), (rows, seq)).astype(np.int32),
          "segment_ids": np.ones((rows, seq), np.int32)}


def test_windowed_logps_equal_the_full_ones_on_the_mask_values_and_gradients():
  from flax import nnx
  batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(0)))
  graphdef, params = nnx.split(build_model(CFG, seed=1))
  mask = batch["loss_mask"].astype(jnp.float32)

  def masked(window, p):
    _, logps, entropy = target_logps(nnx.merge(graphdef, p), batch, window)
    return jnp.sum(logps * mask) + 0.1 * jnp.sum(entropy * mask), (logps, entropy)

  # Jitted: op by op, the backward pass of the model took 17 s of the suite.
  (full, (logps, ent)), g_full = jax.jit(
      jax.value_and_grad(lambda p: masked(None, p), has_aux=True))(params)
  (win, (wlogps, went)), g_win = jax.jit(
      jax.value_and_grad(lambda p: masked(4, p), has_aux=True))(params)
  np.testing.assert_allclose(wlogps * mask, logps * mask, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(went * mask, ent * mask, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(win, full, rtol=1e-6)
  # Outside the window nothing is computed: the prompt positions read 0.
  assert float(jnp.abs(wlogps[0, :2]).sum()) == 0.0 and float(jnp.abs(logps[0, :2]).sum()) > 0
  for a, b in zip(jax.tree.leaves(g_win), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
