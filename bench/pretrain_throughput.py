"""Pretraining throughput of the real train step (AdamW, clipping, loss) on this machine.

  python bench/pretrain_throughput.py --preset=tiny --batch_size=16 --seq_len=256
  python bench/pretrain_throughput.py --preset=llama_100m --batch_size=4 --seq_len=256 --steps=5
  python bench/pretrain_throughput.py --preset=llama3_1b --dtype=bfloat16 \
      --attention=dot_product --remat=dots --batch_size=8 --seq_len=2048   # one GPU: MFU

Batches are random tokens packed as two documents per row, so the data pipeline is not what is
measured; the numbers are steady-state (the compile and one warm-up step are excluded).
"""

import time

import jax
from flax import nnx
import numpy as np
from absl import app, flags

from llmjax import metrics
from llmjax.model.config import model_config
from llmjax.train import loop
from llmjax.train.losses import lm_objective
from llmjax.train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_string("attention", "xla", "Attention backend: xla, dot_product, splash.")
flags.DEFINE_string("remat", "none", "Remat policy: none, full, dots, dots_no_batch.")
flags.DEFINE_bool("scan_layers", False, "Run the blocks under lax.scan.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("grad_accum_steps", 1, "Microbatches per step.")


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (batch, seq + 1), dtype=np.int32)
  half = seq // 2
  segment = np.where(np.arange(seq) < half, 1, 2).astype(np.int32)
  positions = np.where(np.arange(seq) < half, np.arange(seq), np.arange(seq) - half)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((batch, seq), np.int32),
          "segment_ids": np.broadcast_to(segment, (batch, seq)).copy(),
          "positions": np.broadcast_to(positions.astype(np.int32), (batch, seq)).copy()}


def main(_):
  cfg = model_config(FLAGS.preset, {"dtype": FLAGS.dtype, "attention": FLAGS.attention,
                                    "remat": FLAGS.remat, "scan_layers": FLAGS.scan_layers})
  graphdef, params = loop.init_params(cfg, seed=0)
  opt = OptimizerConfig()
  tx = build_optimizer(opt, 1000)
  state = loop.init_train_state({"policy": params}, tx)
  frozen = {"policy": nnx.State({})}
  step = jax.jit(loop.make_train_step({"policy": graphdef}, tx, learning_rate_schedule(opt, 1000),
                                      lm_objective(), FLAGS.grad_accum_steps),
                 donate_argnums=0)
  batch = jax.device_put(random_batch(FLAGS.batch_size, FLAGS.seq_len, cfg.vocab_size))
  t0 = time.time()
  state, m = step(state, frozen, batch)
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  state, m = step(state, frozen, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(FLAGS.steps):
    t = time.time()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    times.append(time.time() - t)
  step_s = float(np.median(times))
  tokens = FLAGS.batch_size * FLAGS.seq_len
  tps = tokens / step_s
  flops = metrics.flops_per_token(cfg, FLAGS.seq_len) * tps
  peak = metrics.peak_flops_per_device()
  print(f"| {FLAGS.preset} | {cfg.num_params() / 1e6:.1f}M | {FLAGS.dtype} "
        f"{FLAGS.attention}/{FLAGS.remat}{'/scan' if FLAGS.scan_layers else ''} | "
        f"{FLAGS.batch_size}x{FLAGS.seq_len} | {step_s * 1e3:.1f} ms | {tps:,.0f} | "
        f"{flops / 1e9:,.1f} GFLOP/s | "
        f"{'%.1f%%' % (100 * flops / (peak * jax.device_count())) if peak else 'n/a'} | "
        f"{compile_s:.1f} s | {jax.devices()[0].device_kind} |")
  print(f"loss after {FLAGS.steps + 2} steps on one repeated batch: {float(m['loss']):.3f}")


if __name__ == "__main__":
  app.run(main)
