"""Memory of the compiled distill train step at a large vocabulary: chunked loss vs not.

  python bench/distill_memory.py                        # vocab 128,256, chunk sizes 0 and 256
  python bench/distill_memory.py --chunk_sizes=0,128,512 --seq_len=4096

Nothing is allocated: the student (a trainable policy), the teacher (a frozen role, in
bfloat16 as the stage holds it by default), the AdamW state and the batch are
ShapeDtypeStructs, and the loop's real step (`loop.make_train_step` with
`stages.distill.distill_objective`, donated state) is lowered and compiled for them. XLA's
buffer assignment (`memory_analysis()`) reports argument (state + teacher + batch), output,
temp (everything else live at once: activations, both models' logits, gradients) and alias
(output reusing the donated state); peak ~ argument + output + temp - alias.

Without chunks both models' `[batch, seq, vocab]` float32 logits (and the student's softmax
and its gradient) exist at full length; with `--chunk_sizes=N` the output layers run over N
positions at a time inside a rematerialized scan (`distill.losses.distill_loss`).
"""

from __future__ import annotations

import os
import sys
import time

# The llmjax of this checkout, whatever is installed (bench/ is sys.path[0] for a script).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from llmjax.model.config import model_config  # noqa: E402
from llmjax.model.transformer import build_model  # noqa: E402
from llmjax.stages.distill import TEACHER, DistillConfig, distill_objective  # noqa: E402
from llmjax.train import loop, roles  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("vocab_size", 128_256, "Vocabulary (Llama 3's by default).")
flags.DEFINE_integer("student_d_model", 256, "Student width (2 layers).")
flags.DEFINE_integer("teacher_d_model", 512, "Teacher width (4 layers).")
flags.DEFINE_integer("batch_size", 1, "Rows per step.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
flags.DEFINE_list("chunk_sizes", ["0", "256"], "TrainConfig.loss_chunk_size values (0: none).")
flags.DEFINE_float("beta", 0.5, "DistillConfig.beta.")
flags.DEFINE_float("alpha", 0.5, "DistillConfig.alpha (the CE term's weight).")

GIB = 1 << 30


def configs():
  base = dict(vocab_size=FLAGS.vocab_size, max_seq_len=max(FLAGS.seq_len, 512))
  student = model_config("tiny", dict(base, d_model=FLAGS.student_d_model,
                                      d_ff=3 * FLAGS.student_d_model))
  teacher = model_config("tiny", dict(base, d_model=FLAGS.teacher_d_model, n_layers=4,
                                      d_ff=3 * FLAGS.teacher_d_model, n_heads=8, n_kv_heads=4,
                                      dtype="bfloat16", param_dtype="bfloat16"))
  return student, teacher


def measure(chunk_size: int) -> dict:
  student_cfg, teacher_cfg = configs()
  s_gd, s_params = nnx.split(nnx.eval_shape(lambda: build_model(student_cfg)))
  t_gd, t_params = nnx.split(nnx.eval_shape(lambda: build_model(teacher_cfg)))
  tx = optax.adamw(1e-4)
  state = jax.eval_shape(lambda t: loop.init_train_state(t, tx), {roles.POLICY: s_params})
  frozen = {roles.POLICY: nnx.State({}), TEACHER: t_params}
  shape = (FLAGS.batch_size, FLAGS.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
           for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
  loss_fn = distill_objective(DistillConfig(beta=FLAGS.beta, alpha=FLAGS.alpha), chunk_size)
  step = jax.jit(loop.make_train_step({roles.POLICY: s_gd, TEACHER: t_gd}, tx,
                                      optax.constant_schedule(1e-4), loss_fn, 1),
                 donate_argnums=0)
  t0 = time.time()
  compiled = step.lower(state, frozen, batch).compile()
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  return {"chunk": chunk_size, "arg": arg, "out": out, "temp": temp, "alias": alias,
          "peak": arg + out + temp - alias, "compile_s": time.time() - t0}


def main(argv):
  del argv
  student_cfg, teacher_cfg = configs()
  logits = FLAGS.batch_size * FLAGS.seq_len * FLAGS.vocab_size * 4
  print(f"student {student_cfg.num_params() / 1e6:.1f}M float32, teacher "
        f"{teacher_cfg.num_params() / 1e6:.1f}M bfloat16, vocab {FLAGS.vocab_size:,}, batch "
        f"{FLAGS.batch_size}x{FLAGS.seq_len}: one float32 logits tensor is "
        f"{logits / GIB:.2f} GiB; {jax.default_backend()}, jax {jax.__version__}\n")
  print("| loss_chunk_size | argument | output | temp | alias | peak | compile |")
  print("|---|---|---|---|---|---|---|")
  for chunk in (int(c) for c in FLAGS.chunk_sizes):
    r = measure(chunk)
    g = lambda k: f"{r[k] / GIB:.2f} GiB"
    print(f"| {chunk or 'none'} | {g('arg')} | {g('out')} | {g('temp')} | {g('alias')} | "
          f"{g('peak')} | {r['compile_s']:.1f} s |", flush=True)


if __name__ == "__main__":
  app.run(main)
