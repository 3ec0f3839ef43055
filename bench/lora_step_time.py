"""Step time of LoRA training vs the frozen-base forward+backward it builds on (and full FT).

  python bench/lora_step_time.py --presets=tiny --batch_size=8 --seq_len=256         # CPU
  python bench/lora_step_time.py --presets=llama_100m --batch_size=2 --seq_len=256 --steps=3
  python bench/lora_step_time.py --presets=llama3_1b --dtype=bfloat16 \\
      --param_dtype=bfloat16 --attention=dot_product --remat=none --scan_layers \\
      --batch_size=4 --seq_len=2048                                          # one GPU

Three steps of the train loop on the same model and batch (`lora_variants.py`):
  frozen: only the first block's input_norm weight trains, so the backward pass runs through
          every block (it must reach block 0) but computes no projection weight gradient:
          the floor a LoRA step cannot go below.
  lora:   r=16 adapters on all seven block projections, base frozen.
  full:   every parameter trains (for context).
The issue's target is lora <= 1.10x frozen. Prefer --remat=none (or scan_layers with remat):
under 'dots' the Pallas LoRA output is not saved and is recomputed in the backward, and
remat without scan_layers fails to trace with a frozen base (bench/RESULTS.md). The LoRA
kernel is 'auto': the fused Pallas kernel on GPU/TPU, the XLA three-matmul path on CPU
(interpret mode would time an emulator).

The variants take turns (`--rounds` of `--steps` timed steps each, after the compile and one
more untimed step), so load from other jobs falls on all of them; the reported time is the median
of each variant's timed steps.
"""

from __future__ import annotations

import os
import sys
import time

# The llmjax of this checkout, whatever is installed (bench/ is sys.path[0] for a script).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import lora_variants as lv  # noqa: E402
from llmjax.model.config import model_config  # noqa: E402
from llmjax.train import loop, roles  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny"], "Model presets.")
flags.DEFINE_list("variants", ["frozen", "lora", "full"], "Of frozen, lora, qlora, full; "
                  "ratios are to frozen.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_string("param_dtype", "float32", "Parameter (storage) dtype.")
flags.DEFINE_string("attention", "xla", "Attention backend: xla, dot_product, splash.")
flags.DEFINE_string("remat", "none", "Remat policy: none, full, dots, dots_no_batch.")
flags.DEFINE_bool("scan_layers", False, "lax.scan over the blocks.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("steps", 5, "Timed steps per variant per round.")
flags.DEFINE_integer("rounds", 2, "Rounds of turns between the variants.")
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_string("lora_kernel", "auto", "LoRA kernel: auto (xla on CPU, pallas "
                    "elsewhere), xla, pallas.")
flags.DEFINE_string("quant_kernel", "pallas", "int4 kernel of the qlora variant: pallas or "
                    "reference.")


class Variant:
  """One variant's jitted step and its own (donated) state, stepped in place."""

  def __init__(self, cfg, name: str, base_params, batch):
    lora_cfg = lv.lora_config(name, FLAGS.rank, FLAGS.lora_kernel, FLAGS.quant_kernel)
    role = lv.variant_role(cfg, name, lora_cfg, init=base_params)
    graphdef, trainable, self.frozen = lv.placed_split(role)
    self.frozen = {roles.POLICY: self.frozen}
    self.name, self.trainable = name, lv.count(trainable)
    tx, schedule = lv.optimizer(trainable)
    self.state = loop.init_train_state({roles.POLICY: trainable}, tx)
    self.step = lv.train_step(graphdef, tx, schedule)
    self.batch = batch
    t0 = time.time()
    self.run()
    self.compile_s = time.time() - t0
    # A second untimed step: the first one's outputs may differ in dtype from its inputs
    # (bf16 AdamW moments come back float32), which compiles the step once more.
    self.run()
    self.times: list[float] = []

  def run(self) -> float:
    t0 = time.perf_counter()
    self.state, metrics = self.step(self.state, self.frozen, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0


def main(_):
  on_cpu = FLAGS.lora_kernel == "auto" and jax.default_backend() == "cpu"
  print(f"# train step time ({jax.devices()[0].device_kind}, jax {jax.__version__}); compute "
        f"{FLAGS.dtype}, params {FLAGS.param_dtype}, attention {FLAGS.attention}, remat "
        f"{FLAGS.remat}, scan_layers={FLAGS.scan_layers}, LoRA r={FLAGS.rank} kernel "
        f"{FLAGS.lora_kernel}{' (xla on cpu)' if on_cpu else ''}; median of "
        f"{FLAGS.rounds}x{FLAGS.steps} timed steps")
  print("| model | variant | trainable | batch | step | tokens/s | vs frozen | compile |")
  print("|---|---|---|---|---|---|---|---|")
  for preset in FLAGS.presets:
    cfg = model_config(preset, {"dtype": FLAGS.dtype, "param_dtype": FLAGS.param_dtype,
                                "attention": FLAGS.attention, "remat": FLAGS.remat,
                                "scan_layers": FLAGS.scan_layers})
    # One random base for every variant: LoRA adapts it, the others start from it.
    _, base = loop.init_params(cfg, seed=0)
    batch = jax.device_put(lv.random_batch(FLAGS.batch_size, FLAGS.seq_len, cfg.vocab_size))
    variants = [Variant(cfg, name, base, batch) for name in FLAGS.variants]
    del base
    for _ in range(FLAGS.rounds):
      for v in variants:
        v.times += [v.run() for _ in range(FLAGS.steps)]
    median = {v.name: float(np.median(v.times)) for v in variants}
    tokens = FLAGS.batch_size * FLAGS.seq_len
    for v in variants:
      t = median[v.name]
      ratio = f"{t / median['frozen']:.2f}x" if "frozen" in median else "n/a"
      print(f"| {preset} | {v.name} | {v.trainable / 1e6:,.2f}M | "
            f"{FLAGS.batch_size}x{FLAGS.seq_len} | {t * 1e3:,.1f} ms | {tokens / t:,.0f} | "
            f"{ratio} | {v.compile_s:.1f} s |", flush=True)


if __name__ == "__main__":
  app.run(main)
