"""Pretraining throughput of the real train step (AdamW, clipping, loss) on this machine.

  python bench/pretrain_throughput.py --preset=tiny --batch_size=16 --seq_len=256
  python bench/pretrain_throughput.py --preset=llama_100m --batch_size=4 --seq_len=256 --steps=5
  python bench/pretrain_throughput.py --preset=llama3_1b --dtype=bfloat16 \
      --attention=dot_product --remat=dots --batch_size=8 --seq_len=2048   # one GPU: MFU

Batches are random tokens packed as two documents per row, so the data pipeline is not what is
measured; the numbers are steady-state (the compile and one warm-up step are excluded).
"""

import os
import sys
import time

# The llmjax of this checkout, whatever is installed (bench/ is sys.path[0] for a script).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import lora_variants as lv  # noqa: E402
from llmjax import metrics  # noqa: E402
from llmjax.model.config import model_config  # noqa: E402
from llmjax.train import loop  # noqa: E402
from llmjax.train.optimizer import (OptimizerConfig, build_optimizer,  # noqa: E402
                                    learning_rate_schedule)

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float16: with dynamic loss scaling).")
flags.DEFINE_string("attention", "xla", "Attention backend: xla, dot_product, splash.")
flags.DEFINE_string("remat", "none", "Remat policy: none, full, dots, dots_no_batch.")
flags.DEFINE_bool("scan_layers", False, "Run the blocks under lax.scan.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("grad_accum_steps", 1, "Microbatches per step.")


def main(_):
  cfg = model_config(FLAGS.preset, {"dtype": FLAGS.dtype, "attention": FLAGS.attention,
                                    "remat": FLAGS.remat, "scan_layers": FLAGS.scan_layers})
  graphdef, params = loop.init_params(cfg, seed=0)
  opt = OptimizerConfig()
  tx = build_optimizer(opt, 1000)
  scaling = loop.TrainConfig().resolved_loss_scale(cfg.dtype)  # float16: the dynamic scale
  state = loop.init_train_state({"policy": params}, tx, loss_scale=scaling)
  frozen = {"policy": nnx.State({})}
  step = lv.train_step(graphdef, tx, learning_rate_schedule(opt, 1000),
                       grad_accum_steps=FLAGS.grad_accum_steps, loss_scale=scaling)
  batch = jax.device_put(lv.random_batch(FLAGS.batch_size, FLAGS.seq_len, cfg.vocab_size))
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
