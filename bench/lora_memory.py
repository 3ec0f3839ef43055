"""Memory of the compiled train step: full fine-tuning vs LoRA vs QLoRA, from shapes alone.

  python bench/lora_memory.py                                  # llama3_1b and llama3_8b
  python bench/lora_memory.py --presets=llama3_1b --param_dtypes=bfloat16

Nothing is allocated: the model, its trainable/frozen split (by the role's filter, as the train
loop splits it), the optimizer state (`jax.eval_shape(tx.init, ...)`) and the batch are
ShapeDtypeStructs; the loop's real step (AdamW, clipping, donated state) is lowered and
compiled for them, and XLA's buffer assignment reports (`memory_analysis()`):
  argument: the train state + frozen base + batch;  output: the new state + metrics;
  temp: everything else live at once (activations, gradients, optimizer temporaries);
  alias: output bytes that reuse donated argument buffers (the train state);
  peak ~ argument + output + temp - alias.

Variants: full (every nnx.Param trains, AdamW), lora (r=16 on all seven block projections,
base frozen in param_dtype), qlora (the same adapters over an NF4 base, group 64). Compute
dtype bf16 by default; param_dtype float32 and bfloat16 rows. On CPU the LoRA kernel is
'xla' and the int4 kernel 'reference' (dequantize + XLA dot): Pallas interpret mode would
compile an emulation of the kernel whose buffers say nothing about the real one. On a GPU
the defaults are the Pallas kernels. The numbers are XLA's buffer assignment on the backend
it runs on: a GPU's fusions differ from the CPU's, so take CPU rows as estimates.
"""

from __future__ import annotations

import os
import sys
import time

# The llmjax of this checkout, whatever is installed (bench/ is sys.path[0] for a script).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

import lora_variants as lv  # noqa: E402
from llmjax.model.config import model_config  # noqa: E402
from llmjax.train import loop, roles  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["llama3_1b", "llama3_8b"], "Model presets.")
flags.DEFINE_list("variants", ["full", "lora", "qlora"], "Of full, lora, qlora, frozen.")
flags.DEFINE_list("param_dtypes", ["float32", "bfloat16"], "Parameter (storage) dtypes.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_integer("batch_size", 1, "Sequences per step.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_string("remat", "full", "Remat policy: none, full, dots, dots_no_batch.")
flags.DEFINE_bool("scan_layers", True, "lax.scan over the blocks (one block to compile).")
flags.DEFINE_string("attention", "xla", "Attention backend: xla, dot_product, splash.")
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_string("lora_kernel", "auto", "LoRA kernel: auto (xla on CPU, pallas "
                    "elsewhere), xla, pallas.")
flags.DEFINE_string("quant_kernel", None, "int4 kernel: pallas or reference (default: "
                    "reference on CPU, pallas elsewhere).")
flags.DEFINE_integer("loss_chunk_size", 0, "TrainConfig.loss_chunk_size (0: whole logits).")
flags.DEFINE_bool("steady_state", False, "Lower with the state the first step returns, not the "
                  "one init_train_state makes (they differ in dtype where the step promotes: "
                  "bf16 AdamW moments come back float32).")

GIB = 1 << 30


def measure(cfg, variant: str) -> dict:
  quant_kernel = FLAGS.quant_kernel or ("reference" if jax.default_backend() == "cpu"
                                        else "pallas")
  lora_cfg = lv.lora_config(variant, FLAGS.rank, FLAGS.lora_kernel, quant_kernel)
  role = lv.variant_role(cfg, variant, lora_cfg)
  graphdef, trainable, frozen = lv.abstract_split(role)
  tx, schedule = lv.optimizer(trainable)
  state = jax.eval_shape(lambda t: loop.init_train_state(t, tx), {roles.POLICY: trainable})
  batch = lv.abstract_batch(FLAGS.batch_size, FLAGS.seq_len)
  step = lv.train_step(graphdef, tx, schedule, FLAGS.loss_chunk_size)
  if FLAGS.steady_state:
    state = jax.eval_shape(step, state, {roles.POLICY: frozen}, batch)[0]
  t0 = time.time()
  compiled = step.lower(state, {roles.POLICY: frozen}, batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  return {"trainable": lv.count(trainable), "frozen_bytes": lv.nbytes(frozen),
          "state_bytes": lv.nbytes(state), "arg": arg, "out": out, "temp": temp,
          "alias": alias, "peak": arg + out + temp - alias, "compile_s": compile_s}


def main(_):
  backend = jax.default_backend()
  print(f"# compiled train-step memory ({jax.devices()[0].device_kind}, jax {jax.__version__}); "
        f"batch {FLAGS.batch_size}x{FLAGS.seq_len}, compute {FLAGS.dtype}, remat "
        f"{FLAGS.remat}, scan_layers={FLAGS.scan_layers}, attention {FLAGS.attention}, "
        f"LoRA r={FLAGS.rank} kernel {FLAGS.lora_kernel}"
        f"{' (xla on cpu)' if FLAGS.lora_kernel == 'auto' and backend == 'cpu' else ''}, "
        f"int4 kernel {FLAGS.quant_kernel or ('reference' if backend == 'cpu' else 'pallas')}"
        f"{'; state after one step' if FLAGS.steady_state else ''}")
  print("| model | variant | params | trainable | state GiB | frozen GiB | argument GiB "
        "| output GiB | temp GiB | alias GiB | peak GiB | vs full | compile |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for preset in FLAGS.presets:
    for pdt in FLAGS.param_dtypes:
      cfg = model_config(preset, {"dtype": FLAGS.dtype, "param_dtype": pdt,
                                  "remat": FLAGS.remat, "scan_layers": FLAGS.scan_layers,
                                  "attention": FLAGS.attention})
      full_peak = None
      for variant in FLAGS.variants:
        r = measure(cfg, variant)
        if variant == "full":
          full_peak = r["peak"]
        ratio = f"{r['peak'] / full_peak:.3f}x" if full_peak else "n/a"
        print(f"| {preset} | {variant} ({pdt}) | {cfg.num_params() / 1e9:.2f}B | "
              f"{r['trainable'] / 1e6:,.1f}M | {r['state_bytes'] / GIB:.2f} | "
              f"{r['frozen_bytes'] / GIB:.2f} | {r['arg'] / GIB:.2f} | {r['out'] / GIB:.2f} | "
              f"{r['temp'] / GIB:.2f} | {r['alias'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
              f"{ratio} | {r['compile_s']:.0f} s |", flush=True)


if __name__ == "__main__":
  app.run(main)
